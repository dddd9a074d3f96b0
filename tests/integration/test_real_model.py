"""The real SmolLM2-135M-Instruct, from its GGUF file, end to end (short): dequantized once and cached, QLoRA SFT on
the arithmetic task whose loss falls, the base recorded as a GGUF in the banner, manifest and model card, the
before-measure cached for the next run, and the GGUF round trip: `ft export --format gguf` verified by llama.cpp,
the prompt llama.cpp builds from the GGUF's own template tokenized exactly as we trained, and the Ollama Modelfile
rendering the same text.

Needs the model: `make real-model` (CI runs it); skipped, naming that command, when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.model.fetch import MODELS, model_path

ROOT = Path(__file__).resolve().parents[2]
GGUF = model_path("smollm2-135m", ROOT)
CACHE = ROOT / ".cache" / "finetune" / "gguf"  # the project's cache: dequantized once for every test and run here
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is missing: run `make real-model`")


def _recipe(out: Path, name: str, extra: str = "") -> Path:
    path = out / f"{name}.yaml"
    path.write_text(f"""
extends: {ROOT / 'recipes' / 'smollm2' / 'sft.yaml'}
name: {name}
model: {{name_or_path: {GGUF}, gguf_cache: {CACHE}}}
data:
  train: [{{path: {ROOT / 'data/smollm2/sft_train.jsonl'}, format: messages, max_samples: 48}}]
  eval: [{{path: {ROOT / 'data/smollm2/sft_eval.jsonl'}, format: messages, max_samples: 8}}]
  task_eval: {ROOT / 'data/smollm2/sft_eval.jsonl'}
  task_eval_max_rows: 8
  task_eval_max_new_tokens: 8
  cache_dir: {out / 'data-cache'}
training: {{max_steps: 6, micro_batch_size: 8, learning_rate: 1.0e-3, warmup_ratio: 0, logging_steps: 1}}
eval: {{general_text: {ROOT / 'data/general/pydoc.txt'}, max_rows: 4}}
output: {{dir: {out / name}}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from finetune import train

    out = tmp_path_factory.mktemp("real")
    train(_recipe(out, "smollm2-short"))
    return out / "smollm2-short"


def test_sft_from_gguf_learns_and_says_where_the_base_came_from(real_run):
    losses = [m["loss"] for m in map(json.loads, (real_run / "metrics.jsonl").read_text().splitlines())
              if "loss" in m and "eval_loss" not in m]
    assert len(losses) == 6 and sum(losses[-3:]) / 3 < 0.6 * losses[0], losses  # the format is learned in 6 steps
    summary = json.loads((real_run / "sft" / "summary.json").read_text())
    base_line = [p for p in summary["patches"] if p.startswith("base:")]
    assert base_line and "from GGUF SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, llama), dequantized" in base_line[0]
    assert summary["metrics"]["task_before"]["exact_match"] == 0.0  # it answers in sentences before
    assert "forgetting" in summary["metrics"]
    manifest = json.loads((real_run / "manifest.json").read_text())["base_model"]
    assert manifest["gguf"]["quant_type"] == "Q4_1" and manifest["gguf"]["architecture"] == "llama"
    assert manifest["files_sha256"] == {GGUF.name: MODELS["smollm2-135m"].sha256}
    folder = CACHE / "b179c9523d0e6a0f98a3"
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["quant_type"] == "Q4_1" and (folder / "model.safetensors").is_file()
    tokenizer_config = json.loads((real_run / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] != tokenizer_config["eos_token"] == "<|im_end|>"


def test_dequantized_weights_are_the_gguf_values(real_run):
    """One tensor read by the gguf package and dequantized by it equals the cached safetensors weight."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(GGUF))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(576, 1536)
    with safe_open(str(CACHE / "b179c9523d0e6a0f98a3" / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.layers.0.mlp.down_proj.weight").numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected.astype(np.float32))


def test_second_run_reuses_the_dequantized_base_and_the_before_measure(real_run, tmp_path, monkeypatch, capsys):
    from finetune import train
    from finetune.model import gguf_base

    def no_convert(*args, **kwargs):
        raise AssertionError("the GGUF was dequantized again")

    monkeypatch.setattr(gguf_base, "_convert", no_convert)
    from finetune.eval import tasks

    generated = []
    real = tasks.task_metrics
    monkeypatch.setattr(tasks, "task_metrics", lambda *a, **k: generated.append(1) or real(*a, **k))
    first = json.loads((real_run / "sft" / "summary.json").read_text())["metrics"]["task_before"]
    recipe = _recipe(tmp_path, "again", "")
    cache = real_run.parent / "data-cache"  # the first run's data cache holds its before-measure
    text = recipe.read_text().replace(f"cache_dir: {tmp_path / 'data-cache'}", f"cache_dir: {cache}")
    recipe.write_text(text.replace("max_steps: 6", "max_steps: 1"))
    train(recipe)
    again = json.loads((tmp_path / "again" / "sft" / "summary.json").read_text())["metrics"]["task_before"]
    assert again == first and len(generated) == 1  # only the after-measure generated answers
    assert "the base model's measure of an earlier run" in capsys.readouterr().out


def test_gguf_round_trip_verified_by_llama_cpp(real_run, tmp_path):
    """Export to f16: llama.cpp's token ids, logits and greedy answers match; the GGUF's own template, rendered by
    llama-cpp-python and tokenized by llama.cpp, gives the ids the data pipeline trained on; the Modelfile's SYSTEM
    is the template's default system prompt."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from finetune.export.command import export_run
    from finetune.export.modelfile import render_parts, template_parts

    out = export_run(real_run, "gguf", quant="f16", out=tmp_path / "gguf").out
    meta = json.loads((out / "export.json").read_text())
    assert meta["gguf"]["tokenization"]["identical"] == meta["gguf"]["tokenization"]["conversations"] > 0
    figures = meta["verification"]["llama.cpp"]
    assert figures["mean_kl"] < 1e-4 and figures["top1_agreement_decisive"] >= 0.98, figures
    from finetune.data import build_dataset
    from finetune.recipe.schema import load_recipe

    tokenizer = AutoTokenizer.from_pretrained(str(real_run / "tokenizer"))
    recipe = load_recipe(real_run / "recipe.yaml")
    eval_ds = build_dataset(recipe.data, tokenizer, "sft", seed=42, split="eval")
    trained_ids = [list(ids) for ids in eval_ds["input_ids"]]
    every = [json.loads(line) for line in (ROOT / "data/smollm2/sft_eval.jsonl").read_text().splitlines()]
    # the conversations of the first trained samples (the pipeline picks and orders the rows it keeps)
    rows = [next(r for r in every if f"\n{r['messages'][0]['content']}<|im_end|>" in tokenizer.decode(t))
            for t in trained_ids[:4]]
    llm = llama_cpp.Llama(model_path=str(out / meta["gguf"]["file"]), n_ctx=256, verbose=False, vocab_only=True)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        for row in rows:
            conversation = row["messages"]
            whole = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="", add_generation_prompt=False)
            text = whole(messages=conversation).prompt
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            # the sample the data pipeline built for this conversation (it may end at the end-of-turn token)
            assert any(ids[: len(t)] == t and len(t) >= len(ids) - 1 for t in trained_ids[:4]), (text, ids)
            prompt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")(messages=conversation[:-1])
            asked = llm.tokenize(prompt.prompt.encode(), add_bos=False, special=True)
            assert ids[: len(asked)] == asked  # what llama.cpp is asked at inference is what training saw first
            assert "You are a helpful AI assistant named SmolLM" in text  # the default system prompt is kept
    finally:
        llm.close()
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    parts = template_parts(tokenizer)
    prompt = rows[0]["messages"][:1]
    assert render_parts(parts, prompt, True) == tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                              add_generation_prompt=True)
