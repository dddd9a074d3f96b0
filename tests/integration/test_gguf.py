"""GGUF export checked by llama.cpp itself (llama-cpp-python, built from source by `make setup`).

A quickstart-style run (the shipped tiny chat model, QLoRA on the quickstart data, a short training) exports to f16
and q8_0 through `ft export`, and llama.cpp's tokens, logits and greedy answers match the merged model. Each
architecture mapping is checked on a tiny random model of that architecture with the same tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.export.command import export_run
from finetune.export.llamacpp import THRESHOLDS

ROOT = Path(__file__).resolve().parents[2]
TINY_CHAT = ROOT / "models" / "tiny-chat"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """recipes/quickstart.yaml, shortened: 8 steps on the shipped model and data."""
    from finetune import train

    out = tmp_path_factory.mktemp("gguf")
    (out / "recipe.yaml").write_text(f"""
extends: {ROOT / 'recipes' / 'quickstart.yaml'}
name: quickstart-gguf
model: {{name_or_path: {TINY_CHAT}}}
data:
  train: [{{path: {ROOT / 'data/quickstart/sft_train.jsonl'}, format: messages, max_samples: 320}}]
  eval: [{{path: {ROOT / 'data/quickstart/sft_eval.jsonl'}, format: messages, max_samples: 16}}]
  task_eval: null
training: {{max_steps: 8, logging_steps: 2}}
output: {{dir: {out / 'run'}}}
""")
    train(out / "recipe.yaml")
    return out / "run"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_quickstart_run_exports_gguf_that_llama_cpp_reproduces(quickstart_run, quant, tmp_path):
    out = tmp_path / quant
    result = CliRunner().invoke(app, ["export", str(quickstart_run), "--format", "gguf", "--quant", quant,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "export.json").read_text())
    gguf = meta["gguf"]
    figures = meta["verification"]["llama.cpp"]
    max_kl, min_top1 = THRESHOLDS[quant]
    assert gguf["quant"] == quant and gguf["llama_cpp"].startswith("llama-cpp-python 0.3")
    assert gguf["tokenization"]["identical"] == gguf["tokenization"]["conversations"] == 16
    assert figures["mean_kl"] <= max_kl and figures["top1_agreement"] >= min_top1
    generations = gguf["generation"]
    assert len(generations) == 3 and any(g["transformers_stopped"] for g in generations)
    assert all(g["llama_cpp_stopped"] for g in generations if g["transformers_stopped"]), generations
    if quant == "f16":  # f16 rounding only: the same greedy answers, token for token
        assert figures["mean_kl"] < 1e-4 and all(g["same_tokens"] for g in generations), generations
    assert (out / gguf["file"]).stat().st_size > 0
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf['file']}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and gguf["llama_cpp"] in card and f"GGUF `{quant}`" in card
    assert "mean KL" in result.output and "identical token ids on 16/16" in result.output


def test_gguf_file_carries_tokenizer_and_template(quickstart_run, tmp_path):
    """What llama.cpp reads back: special ids, the chat template without transformers-only tags, and rendering a
    conversation with llama-cpp-python's own chat formatter gives the text training saw."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    out = export_run(quickstart_run, "gguf", out=tmp_path / "g", verify=False).out
    meta = json.loads((out / "export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(quickstart_run / "sft" / "adapter"))
    llm = llama_cpp.Llama(model_path=str(out / meta["gguf"]["file"]), n_ctx=256, verbose=False)
    try:
        md = llm.metadata
        assert int(md["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id
        assert int(md["tokenizer.ggml.padding_token_id"]) == tokenizer.pad_token_id != tokenizer.eos_token_id
        assert md["tokenizer.ggml.pre"] == "gpt-2" and "endgeneration" not in md["tokenizer.chat_template"]
        messages = [{"role": "user", "content": "What is the home town of Briix Numont?"}]
        formatter = Jinja2ChatFormatter(
            md["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
        ours = formatter(messages=messages).prompt
        assert ours == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    finally:
        llm.close()


def test_refused_above_threshold_and_nothing_written(quickstart_run, tmp_path):
    with pytest.raises(FinetuneError, match=r"export refused: llama.cpp .* q8_0 .*mean KL .* > 1e-12.*Nothing"):
        export_run(quickstart_run, "gguf", out=tmp_path / "q", quant="q8_0", max_kl=1e-12, verify_samples=4)
    assert not list(tmp_path.iterdir())


def test_while_llama_cpp_verifies_no_file_has_a_gguf_name(quickstart_run, tmp_path, monkeypatch):
    """A kill during verification must not leave an unverified file named .gguf (issue 33, item 12): the file
    llama.cpp checks carries `.unverified` until it passed; an interrupt removes the work and the merged model."""
    import finetune.export.gguf as gguf_export

    seen = {}

    def interrupted(run, result, path, merged_dir, *args):
        seen.update(checked=path.name, files=sorted(p.name for p in path.parent.iterdir()), merged=merged_dir.is_dir())
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "_verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(quickstart_run, "gguf", out=tmp_path / "g", verify_samples=2)
    assert seen["checked"] == "quickstart-gguf-sft-f16.gguf.unverified" and seen["merged"], seen
    assert not [name for name in seen["files"] if name.endswith(".gguf")], seen
    assert not list(tmp_path.iterdir())  # neither the unverified file nor the float32 .merged model is left


# --- architecture mappings on tiny random models (same byte-level BPE tokenizer) ---------------------------------

def _config(arch: str):
    import transformers

    common = dict(vocab_size=2106, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25, pad_token_id=2,
                  eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    if arch == "llama3-rope":
        return transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "gemma2":
        return transformers.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16,
                                         query_pre_attn_scalar=16, sliding_window=512,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if arch == "qwen3_moe":  # experts fused as gate_up_proj [experts, 2 x 32, 64]; llama.cpp reads two 3D stacks
        return transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=True)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[arch](**common)


# phi3 is tested in test_gguf_spm.py, with a Phi-3-shaped SentencePiece tokenizer: llama.cpp's phi3 vocabulary
# loader looks up Phi-3's own chat tokens, which this byte-level tokenizer lacks.
@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "mistral", "qwen2", "qwen3", "gemma2", "qwen3_moe",
                                  "mixtral"])
def test_architecture_mapping_matches_transformers(arch, tmp_path):
    """f32 GGUF of a random model: llama.cpp's logits are transformers' up to float rounding (a wrong q/k order,
    norm offset, fused layout or rope setting moves them by orders of magnitude more)."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export.gguf_file import write_gguf
    from finetune.export.gguf_vocab import build_vocab
    from finetune.export.verify import compare_forwards

    torch.manual_seed(0)
    config = _config(arch)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases (qwen2) and norms start at 0 / 1: make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    vocab = build_vocab(tokenizer, TINY_CHAT, config.vocab_size)
    write_gguf(tmp_path / "m.gguf", state, config, vocab, "f32", {"name": arch})
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, n_batch=256, logits_all=True,
                          verbose=False)

    def llama_logits(x):
        llm.reset()
        llm.eval(x[0].tolist())
        return torch.from_numpy(llm.scores[: x.shape[1]].copy())[None]

    text = "<|im_start|>user\n What is the home town of Briix Numont?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"] * 3  # 150+ positions: beyond the llama3 rope's original context of 64
    try:
        figures = compare_forwards(lambda x: model(input_ids=x).logits, llama_logits, [ids])
    finally:
        llm.close()
    assert figures.mean_kl < 1e-5 and figures.top1_agreement > 0.99, figures.line()
    assert math.isfinite(figures.max_abs_logit_diff)
