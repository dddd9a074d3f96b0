"""End to end: `ft train` runs QLoRA SFT (4-bit NF4 base + LoRA via peft, trained by trl) on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app


@pytest.fixture(scope="module")
def sft_run(tiny_model, addition_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    recipe = out / "recipe.yaml"
    recipe.write_text(
        f"""
name: e2e
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: float32}}
lora: {{r: 8, alpha: 16, target_modules: all-linear}}
data:
  train: [{{path: {addition_data['train']}}}]
  eval: [{{path: {addition_data['eval']}}}]
  max_length: 64
training: {{max_steps: 24, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 2, seed: 1}}
output: {{dir: {out / 'run'}}}
"""
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return out / "run"


def test_run_folder_has_everything(sft_run):
    for rel in ("recipe.yaml", "metrics.jsonl", "summary.json", "tokenizer/tokenizer_config.json",
                "sft/adapter/adapter_model.safetensors", "sft/adapter/adapter_config.json", "sft/summary.json"):
        assert (sft_run / rel).exists(), rel
    assert json.loads((sft_run / "summary.json").read_text())["status"] == "finished"


def test_loss_went_down(sft_run):
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.5, losses  # ~4.6 (uniform) to well below
    assert all(r["stage"] == "sft" for r in rows)
    assert any(r.get("tokens_per_second", 0) > 0 for r in rows)
    assert any("grad_norm" in r and "learning_rate" in r for r in rows)


def test_base_weights_were_quantized(sft_run):
    cfg = json.loads((sft_run / "sft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    summary = json.loads((sft_run / "sft" / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 24


def test_adapter_loads_with_plain_peft_and_changes_output(sft_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_run / "tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": "add 3 4"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(sft_run / "sft" / "adapter"))
    with torch.no_grad():
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-2


def test_finished_run_is_not_overwritten(sft_run):
    recipe = sft_run / "recipe.yaml"
    out = CliRunner().invoke(app, ["train", str(recipe)])
    assert out.exit_code == 1 and "already holds a finished run" in out.output
