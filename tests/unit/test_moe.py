"""Mixture-of-Experts (issue 30): the expert-adapter policy (`lora.experts`, `lora.router`) and what `ft validate`
says or refuses for it, peft's false warnings, trainable parameters by group, the merge of expert adapters, 4-bit
experts (`quantization.experts`), the memory estimate counting the experts (and checked against autograd), and the
expert load. Tiny Qwen3-MoE and Mixtral from `scripts/build_fixture_models.py`, tiny Qwen2-MoE from its config."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tinylora import frozen
from typer.testing import CliRunner

from finetune.cli import app
from finetune.model.adapters import attach, groups_text, ignored_lora_keys, trainable_groups
from finetune.recipe.schema import LoraConfig
from finetune.stages.memory import ModelShape, estimate, gb

runner = CliRunner()
ROW = {"messages": [{"role": "user", "content": "What is 1 in words?"}, {"role": "assistant", "content": "one"}]}


def _recipe(tmp_path, model, lora: str, extra: str = "") -> str:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: moe\nmodel: {{name_or_path: {model}, dtype: float32}}\n"
                    f"quantization: {{mode: nf4, compute_dtype: float32}}\nlora: {lora}\n"
                    f"data: {{train: [{{path: {data}}}]}}\noutput: {{dir: {tmp_path / 'run'}}}\n{extra}")
    return str(path)


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
@pytest.mark.parametrize("experts,router", [("none", False), ("per_expert", False), ("per_expert", True),
                                            ("none", True)])
def test_expert_policy_adapts_what_it_says_and_the_estimate_counts_it(moe, family, experts, router):
    """Each policy puts adapters on exactly its groups; the trainable count is the estimate's own
    (`ModelShape.lora_params`), group by group; peft's false 'rank_pattern keys did not match' warning is gone."""
    base = frozen(moe[family])
    shape = ModelShape.of(base.config)
    lora = LoraConfig(r=4, alpha=8, experts=experts, router=router)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach(base, lora)
    assert not [w for w in caught if "did not match" in str(w.message)], [str(w.message) for w in caught]
    groups = trainable_groups(model)
    attention = shape.lora_params(4, "all-linear")  # experts none, router off: attention only
    assert groups["attention"] == attention > 0 and groups["dense MLP"] == 0 and groups["other"] == 0
    expert_only = shape.lora_params(4, "all-linear", experts="per_expert") - attention
    router_only = shape.lora_params(4, "all-linear", router=True) - attention
    assert groups["experts"] == (expert_only if experts == "per_expert" else 0)
    assert groups["router"] == (router_only if router else 0)
    assert sum(groups.values()) == shape.lora_params(4, "all-linear", experts, router)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(groups.values())
    assert f"attention {attention:,}" in groups_text(groups)


def test_per_expert_gradients_reach_every_expert_adapter(moe):
    model = attach(frozen(moe["qwen3-moe"]), LoraConfig(r=4, experts="per_expert"))
    ids = torch.randint(0, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".mlp.experts." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)


def test_saved_expert_adapter_is_not_reported_as_ignored(moe, tmp_path):
    """DPO after SFT starts from the saved adapter: the same `lora` section is not reported as ignored, a different
    expert policy is (by name)."""
    lora = LoraConfig(r=4, experts="per_expert")
    attach(frozen(moe["mixtral"]), lora).save_pretrained(str(tmp_path / "adapter"))
    assert ignored_lora_keys(frozen(moe["mixtral"]), lora, tmp_path / "adapter") == []
    other = ignored_lora_keys(frozen(moe["mixtral"]), LoraConfig(r=4), tmp_path / "adapter")
    assert len(other) == 1 and other[0].startswith("lora.experts: 'none'"), other


def test_validate_says_when_a_qlora_recipe_leaves_the_experts_unquantized(moe, tmp_path):
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["mixtral"], "{r: 4}")])
    assert out.exit_code == 0 and "the experts (most of this model's weight) stay in the model dtype" in out.output
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["mixtral"], "{r: 4}"), "--set",
                              "quantization.experts=true"])
    assert out.exit_code == 0 and "stay in the model dtype" not in out.output, out.output


@pytest.mark.parametrize("lora,key", [("{dropout: 0.05, experts: per_expert}", "lora.experts: per_expert"),
                                      ("{dropout: 0.05, router: true}", "lora.router: true")])
def test_dropout_with_raw_parameter_adapters_is_refused_by_validate(moe, tmp_path, lora, key):
    """peft raises a raw ValueError after loading (`ParamWrapper does not work with lora_dropout != 0`)."""
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["qwen3-moe"], lora)])
    assert out.exit_code == 2 and f"lora.dropout: 0.05 with {key}" in out.output and "set lora.dropout: 0" in \
        out.output and "Traceback" not in out.output, out.output
    # the shipped base recipes' dropout stays fine with the default policy (experts without adapters)
    assert runner.invoke(app, ["validate", "-q", _recipe(tmp_path, moe["qwen3-moe"], "{dropout: 0.05}")]).exit_code == 0


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_dequantized_merge_adds_each_experts_update(moe, family):
    """The merge into the weights training ran (the QLoRA default) adds peft's own update to each expert and the
    router: a plain model loaded with the merged weights gives the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    from finetune.export.merge import _dequantized_merge, plain_config, plain_keys

    model = attach(frozen(moe[family]), LoraConfig(r=4, experts="per_expert", router=True, init_weights=False)).eval()
    keys, _ = plain_keys(plain_config(model))
    state = _dequantized_merge(model, keys, torch.float32)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                "model.layers.0.mlp.gate.weight"):  # the update is in
        assert not torch.equal(state[key], _raw(model, key)), key
    plain = AutoModelForCausalLM.from_config(plain_config(model))
    plain.load_state_dict(state)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)


def _raw(model, key: str) -> torch.Tensor:
    """The base weight under `key` as loaded, before any adapter."""
    module, _, attr = key.rpartition(".")
    return getattr(model.get_base_model().get_submodule(module).get_base_layer(), attr)


def test_estimate_counts_the_experts_as_the_loaded_model_holds_them(moe):
    """The dry run's weights: expert bytes are the loaded model's fused 3D parameters (not quantized by
    bitsandbytes), the rest split as before; the parts add up to the model's parameters."""
    from finetune.recipe.schema import Recipe

    base = frozen(moe["qwen3-moe"])
    shape = ModelShape.of(base.config)
    experts = sum(p.numel() for n, p in base.named_parameters() if ".mlp.experts." in n)
    assert shape.expert_params == experts > 0
    counted = shape.linear_params + shape.expert_params + shape.floating_params
    assert 0 <= sum(p.numel() for p in base.parameters()) - counted < 0.001 * counted  # Qwen3's q/k norms left out
    recipe = Recipe(model={"name_or_path": "m", "dtype": "float32"}, data={"train": [{"path": "x.jsonl"}]})
    mem = estimate(shape, recipe=recipe, training=recipe.training, kind="sft", sequences=1, seq_len=8)
    assert mem.expert_weights == 4 * experts and "expert weights" in mem.line()


QWEN3_30B_A3B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "num_experts": 128, "num_experts_per_tok": 8, "tie_word_embeddings": False}


def test_qwen3_30b_a3b_costs_per_policy(capsys):
    """What each expert policy costs at Qwen3-30B-A3B's shape (QLoRA, r=16, bf16, AdamW, 1 x 2048 tokens,
    checkpointing), printed (`pytest -s`); the model's 30.5B parameters are all accounted for."""
    import transformers

    from finetune.recipe.schema import Recipe

    shape = ModelShape.of(transformers.Qwen3MoeConfig(**QWEN3_30B_A3B))
    assert abs(shape.linear_params + shape.expert_params + shape.floating_params - 30.53e9) < 0.01e9
    rows = {}
    for experts, router in (("none", False), ("per_expert", False), ("per_expert", True)):
        recipe = Recipe(model={"name_or_path": "m", "dtype": "bfloat16"}, data={"train": [{"path": "x.jsonl"}]},
                        quantization={"mode": "nf4"}, lora={"r": 16, "experts": experts, "router": router},
                        training={"gradient_checkpointing": True})
        mem = estimate(shape, recipe=recipe, training=recipe.training, kind="sft", sequences=1, seq_len=2048)
        rows[experts, router] = (shape.lora_params(16, "all-linear", experts, router), mem)
        print(f"experts {experts}, router {router}: {rows[experts, router][0] / 1e6:,.0f}M trainable; {mem.line()}")
    none, per_expert, with_router = (rows[k] for k in rows)
    assert none[0] == 48 * 16 * (4 * 2048 + 2 * 4096 + 2 * 512)  # q, k, v, o at r=16
    assert per_expert[0] - none[0] == 48 * 128 * 16 * (2 * 2048 + 3 * 768)
    assert with_router[0] - per_expert[0] == 48 * 16 * (2048 + 128)
    # bitsandbytes leaves the experts in bf16: 58 GB of the weights whatever the adapter policy
    assert none[1].expert_weights == 2 * 48 * 128 * 3 * 2048 * 768
    assert gb(none[1].expert_weights) == "54.00 GB"
    # 4-bit experts (`quantization.experts`): what fits a 24 GB GPU with the recipes' margin
    from finetune.stages.memory import RECIPE_MARGIN, nf4_bytes

    recipe = Recipe(model={"name_or_path": "m", "dtype": "bfloat16"}, data={"train": [{"path": "x.jsonl"}]},
                    quantization={"mode": "nf4", "experts": True}, lora={"r": 16},
                    training={"gradient_checkpointing": True})
    mem = estimate(shape, recipe=recipe, training=recipe.training, kind="sft", sequences=1, seq_len=2048)
    print(f"experts none, 4-bit experts: {mem.line()}")
    assert mem.expert_weights == nf4_bytes(48 * 128 * 3 * 2048 * 768, True)
    assert mem.total < RECIPE_MARGIN * 24e9 < none[1].total
    # finetune's own expert adapters on the 4-bit experts (model/expert_adapters.py): shared and per expert
    own = {}
    for experts in ("shared", "per_expert"):
        recipe = Recipe(model={"name_or_path": "m", "dtype": "bfloat16"}, data={"train": [{"path": "x.jsonl"}]},
                        quantization={"mode": "nf4", "experts": True}, lora={"r": 16, "experts": experts},
                        training={"gradient_checkpointing": True})
        own[experts] = estimate(shape, recipe=recipe, training=recipe.training, kind="sft", sequences=1,
                                seq_len=2048)
        print(f"experts {experts}, 4-bit experts: {shape.lora_params(16, 'all-linear', experts) / 1e6:,.0f}M "
              f"trainable; {own[experts].line()}")
    assert shape.lora_params(16, "all-linear", "shared") - none[0] == 48 * 16 * (2 * 2048 + 3 * 768)
    assert own["shared"].adapter - mem.adapter == 48 * 16 * (2 * 2048 + 3 * 768) * 16  # weights, grads, AdamW
    assert mem.total < own["shared"].total < RECIPE_MARGIN * 24e9  # a 24 GB GPU still
    # no materialized expert stacks (peft's per_expert keeps two per layer in the recomputed layer)
    assert own["per_expert"].recomputed_layer < per_expert[1].recomputed_layer / 4


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_nf4_experts_forward_equals_the_dequantized_reference(moe, family):
    """`quantization.experts`: the experts' fused weights become NF4 (bitsandbytes' quantize_4bit per expert); the
    model's output equals the same model running transformers' own experts forward on the dequantized weights, the
    4-bit weights are not the original ones; the backward through them is the reference's and reaches the adapters."""
    import copy

    from finetune.model.families import traits
    from finetune.model.moe_experts import NF4Experts, quantize_experts, quantized_expert_numel

    model = frozen(moe[family])
    original, reference = copy.deepcopy(model), copy.deepcopy(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert quantize_experts(model, traits(model.config.model_type).expert_parameters, torch.float32) == 4
    assert quantized_expert_numel(model) == experts
    assert not [n for n, _ in model.named_parameters() if ".mlp.experts." in n]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Experts):
                reference.get_parameter(name).copy_(module.dequantize())
                assert module.packed.dtype == torch.uint8 and module.packed.numel() * 2 == module.numel()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        out, ref, orig = (m(input_ids=ids).logits for m in (model, reference, original))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - orig).abs().max() > 1e-3  # the 4-bit weights really are not the float ones
    # the backward through the 4-bit experts is the dequantized reference's
    grads = []
    for m in (model, reference):
        x = torch.randn(2, 5, m.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
        m.model.layers[0].mlp(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    assert grads[0].abs().sum() > 0
    peft_model = attach(model, LoraConfig(r=4))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "layers.0.self_attn" in n and ".lora_B." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_nf4_experts_only_run_the_routed_experts(moe, monkeypatch):
    """One token routed to top-k experts: exactly k experts' weights go through the 4-bit matmul (twice each: gate/up
    and down), grouped by expert, never the others."""
    from finetune.model.families import traits
    from finetune.model.moe_experts import NF4Experts, quantize_experts

    model = frozen(moe["qwen3-moe"])
    quantize_experts(model, traits("qwen3_moe").expert_parameters, torch.float32)
    calls = []
    original = NF4Experts.linear
    monkeypatch.setattr(NF4Experts, "linear", lambda self, x, e: calls.append((e, x.shape[0])) or original(self, x, e))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]))
    k = model.config.num_experts_per_tok
    assert len(calls) == 2 * k * model.config.num_hidden_layers and all(n == 1 for _, n in calls)


def test_nf4_experts_recipe_rules(moe, tmp_path):
    """Per-expert and shared adapters on 4-bit experts are finetune's own (sft stages only); ranks by routing need
    per-expert adapters."""
    for experts in ("per_expert", "shared"):
        out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["qwen3-moe"], f"{{experts: {experts}}}"),
                                  "--set", "quantization.experts=true"])
        assert out.exit_code == 0, out.output
    dpo = "stages: [{name: sft, kind: sft}, {name: dpo, kind: dpo, data: {train: [{path: x.jsonl}]}}]"
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["qwen3-moe"], "{experts: shared}", dpo)])
    assert out.exit_code == 2 and "lora.experts: shared trains finetune's own expert adapters, supported in sft " \
        "stages only (not dpo" in out.output and "Traceback" not in out.output, out.output
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["qwen3-moe"], "{experts: shared, expert_rank: "
                                                  "by_routing}")])
    assert out.exit_code == 2 and "lora.expert_rank: by_routing sets a rank per expert; it needs lora.experts: " \
        "per_expert (here shared)" in out.output, out.output
    out = runner.invoke(app, ["validate", _recipe(tmp_path, moe["qwen3-moe"], "{r: 4}"), "--set",
                              "quantization.experts=true", "--set", "quantization.mode=none"])
    assert out.exit_code == 2 and "set quantization.mode: nf4" in out.output, out.output


def test_estimate_counts_4bit_experts_as_nf4(moe):
    from finetune.recipe.schema import Recipe
    from finetune.stages.memory import nf4_bytes

    shape = ModelShape.of(frozen(moe["qwen3-moe"]).config)
    recipe = Recipe(model={"name_or_path": "m", "dtype": "float32"}, data={"train": [{"path": "x.jsonl"}]},
                    quantization={"mode": "nf4", "experts": True})
    mem = estimate(shape, recipe=recipe, training=recipe.training, kind="sft", sequences=1, seq_len=8)
    assert mem.expert_weights == nf4_bytes(shape.expert_params, True) < shape.expert_params


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
@pytest.mark.parametrize("experts,nf4", [("none", False), ("per_expert", False), ("none", True), ("shared", True),
                                         ("shared", False), ("per_expert", True)])
def test_moe_activation_estimate_against_what_autograd_keeps(moe, family, experts, nf4):
    """The MoE layer's kept activations (`layer_activation_bytes(moe=True)`: router, routed experts' inputs and
    outputs, peft's materialized expert stacks for `per_expert`, the 4-bit matmul's input copies) against the tensors
    autograd keeps in a training forward of the tiny models (fp32, 4 x 96 tokens), within 15%."""
    from finetune.model.families import traits
    from finetune.model.moe_experts import quantize_experts
    from finetune.recipe.schema import Recipe

    base = frozen(moe[family])
    if nf4:
        quantize_experts(base, traits(base.config.model_type).expert_parameters, torch.float32)
    model = attach(base, LoraConfig(r=8, experts=experts)).train()
    recipe = Recipe(model={"name_or_path": "m", "dtype": "float32"}, lora={"r": 8, "experts": experts},
                    quantization={"mode": "nf4", "experts": nf4}, data={"train": [{"path": "x.jsonl"}]},
                    training={"precision": "fp32"})
    memory = estimate(ModelShape.of(model.config), recipe=recipe, training=recipe.training, kind="sft",
                      sequences=4, seq_len=96, act_bytes=4)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(5, 300, (4, 96), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids)
    kept = memory.kept_activations + 4 * 96 * model.config.hidden_size * 4  # and the final norm's float32 input
    measured = sum(saved.values())
    assert 0.85 * measured <= kept <= 1.15 * measured, (kept, measured)


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_expert_load_counts_the_routers_own_choices(moe, family):
    """The shares are the experts each layer's router hands its tokens to (as the experts module receives them,
    recorded by a hook), padded positions left out; the line names the most used expert."""
    from finetune.eval.routing import expert_load, load_line

    model = frozen(moe[family])
    ids = torch.randint(5, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    seen = []
    hooks = [layer.mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args[1]))
             for layer in model.model.layers]
    shares = expert_load(model, [{"input_ids": ids, "attention_mask": mask}])
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    expected = torch.stack([torch.bincount(idx[keep].reshape(-1), minlength=4) for idx in seen]).double()
    torch.testing.assert_close(shares, expected / expected.sum(-1, keepdim=True))
    assert (shares > 0).sum() > 4 and shares.shape == (2, 4)
    line = load_line(shares, 3)
    assert line.startswith("expert load on 3 training rows") and f"most {shares.max():.3f}" in line


def _tiny(name: str, **sizes):
    import transformers

    config = transformers.AutoConfig.for_model(name, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                               num_key_value_heads=2, num_experts=4, moe_intermediate_size=32,
                                               vocab_size=128, **sizes)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def test_dense_mlp_adapters_are_never_moved_onto_every_expert(capsys):
    """Qwen2-MoE's shared expert keeps its adapters (peft leaves that family's names alone); the dense MLP layers of a
    Qwen3-MoE (`mlp_only_layers`) get none, with a note, where peft 0.21 would turn them into LoRA on every expert."""
    base = _tiny("qwen2_moe", num_hidden_layers=1, shared_expert_intermediate_size=32)
    shape = ModelShape.of(base.config)
    groups = trainable_groups(attach(base, LoraConfig(r=4)))
    assert sum(groups.values()) == shape.lora_params(4, "all-linear")  # the estimate counts the shared expert too
    assert groups["experts"] == 0 and groups["router"] == 0 and groups["attention"] > 0
    assert groups["dense MLP"] == 4 * (3 * (64 + 32) + 64 + 1)  # shared expert's gate, up, down; shared_expert_gate
    assert "get no adapter" not in capsys.readouterr().out
    groups = trainable_groups(attach(_tiny("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0]), LoraConfig(r=4)))
    assert groups["experts"] == 0 and groups["dense MLP"] == 0 and groups["attention"] > 0
    assert "down_proj, gate_proj, up_proj get no adapter on this Mixture-of-Experts model" in capsys.readouterr().out


def test_families_peft_rewrites_are_peft_own():
    """`Traits.peft_moves_mlp_names` is what peft's v4 -> v5 conversion table says (an upgrade fails here)."""
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN

    from finetune.model.families import TRAITS

    for kind, row in TRAITS.items():
        assert row.peft_moves_mlp_names == (kind in _MODEL_TO_CONVERSION_PATTERN), kind
