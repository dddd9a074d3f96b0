"""GGUF export of Mixture-of-Experts models (issue 30), the parts that need no llama.cpp: the fused experts split in
transformers' own order, the expert hyperparameters written, and the MoE models llama.cpp would run differently
refused by `ft validate` (and by `ft export` before a model loads). llama.cpp's own check of trained runs is
`tests/integration/test_moe_gguf.py`."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.export.gguf_arch import arch_of, split_experts, write_hparams
from finetune.export.support import family_lines
from finetune.recipe.schema import Recipe

SMALL = {"vocab_size": 300, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 48}


def _qwen3_moe(**extra):
    import transformers

    return transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                       **{"norm_topk_prob": True, **extra})


def test_fused_experts_split_as_transformers_computes_them():
    """Each expert's output from the split gate/up/down stacks equals transformers' experts forward (gate first)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    experts = Qwen3MoeExperts(_qwen3_moe())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    parts = dict(split_experts("model.layers.1.mlp.experts.gate_up_proj", experts.gate_up_proj.detach().numpy()))
    parts |= dict(split_experts("model.layers.1.mlp.experts.down_proj", experts.down_proj.detach().numpy()))
    stem = "model.layers.1.mlp.experts."
    assert sorted(parts) == [f"{stem}down_proj.weight", f"{stem}gate_proj.weight", f"{stem}up_proj.weight"]
    gate, up, down = (torch.from_numpy(parts[f"{stem}{k}_proj.weight"]) for k in ("gate", "up", "down"))
    assert gate.shape == up.shape == (4, 8, 16) and down.shape == (4, 16, 8)
    x = torch.randn(5, 16)
    for e in range(4):
        routed = torch.full((5, 2), (e + 1) % 4)  # the second slot at weight 0 (transformers 5.17 has no
        routed[:, 0] = e                            # "routed nowhere" index: one_hot needs every index < experts)
        want = experts(x, routed, torch.tensor([[1.0, 0.0]] * 5))
        got = (torch.nn.functional.silu(x @ gate[e].T) * (x @ up[e].T)) @ down[e].T
        torch.testing.assert_close(got, want.detach())
    weight = torch.zeros(3, 3).numpy()
    assert split_experts("model.layers.0.mlp.gate.weight", weight)[0][1] is weight  # the router passes unchanged


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_expert_hyperparameters_llama_cpp_reads(tmp_path, kind):
    import gguf
    import transformers

    config = _qwen3_moe() if kind == "qwen3_moe" else transformers.MixtralConfig(
        **SMALL, num_local_experts=8, num_experts_per_tok=2)
    arch = arch_of(config, "test").gguf
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    write_hparams(writer, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = {f.name: f.contents() for f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.values()}
    experts = 4 if kind == "qwen3_moe" else 8
    assert fields[f"{arch}.expert_count"] == experts and fields[f"{arch}.expert_used_count"] == 2
    assert fields[f"{arch}.feed_forward_length"] == 48
    # Qwen3-MoE's expert size has its own key; llama.cpp's llama reads Mixtral's from feed_forward_length
    assert fields.get(f"{arch}.expert_feed_forward_length") == (8 if kind == "qwen3_moe" else None)


def _lines(tmp_path, config: dict) -> list[str]:
    folder = tmp_path / "base"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return family_lines(Recipe(model={"name_or_path": str(folder)}, data={"train": [{"path": "x"}]}))


@pytest.mark.parametrize("change,why", [
    ({"norm_topk_prob": False}, "norm_topk_prob: false"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
])
def test_validate_refuses_gguf_for_a_qwen3_moe_llama_cpp_runs_differently(tmp_path, change, why):
    config = {**_qwen3_moe().to_dict(), **change}
    lines = _lines(tmp_path, config)
    assert lines[0] == "# model family: qwen3_moe" and len(lines) == 2, lines
    assert lines[1].startswith("#   ft export --format gguf: refused, llama.cpp would not run this qwen3_moe model")
    assert why in lines[1] and "instead: ft export --format merged" in lines[1]
    import transformers

    with pytest.raises(FinetuneError, match=f"cannot write this qwen3_moe model: .*{why}.*--format merged"):
        arch_of(transformers.Qwen3MoeConfig(**{k: v for k, v in config.items() if k != "model_type"}), "base")


def test_validate_accepts_qwen3_moe_as_released_and_mixtral(tmp_path):
    assert _lines(tmp_path, _qwen3_moe().to_dict()) == ["# model family: qwen3_moe"]
    assert _lines(tmp_path, {"model_type": "mixtral"}) == ["# model family: mixtral"]


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe"])
def test_validate_refuses_gguf_for_an_moe_architecture_not_written(tmp_path, kind):
    lines = _lines(tmp_path, {"model_type": kind})
    assert f"ft export --format gguf: refused, this toolkit does not write the '{kind}' architecture" in lines[1]
    assert "qwen3_moe" in lines[1] and "mixtral" in lines[1]  # what it does write
