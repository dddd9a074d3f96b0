"""The recipe's `kernels:` switches reach the trained model instance in an SFT stage (torch paths on CPU)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from finetune.cli import app


def test_sft_with_all_kernels_on_trains_and_reports_patches(tiny_model, addition_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
name: kernels
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {addition_data['train']}}}], max_length: 64}}
training: {{max_steps: 6, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1}}
kernels: {{lora_linear: true, lora_mlp: true, lora_qkvo: true, fused_ce: true, rmsnorm: true, rope: true}}
output: {{dir: {tmp_path / 'run'}}}
"""
    )
    out = CliRunner().invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    assert "kernel:" in out.output  # apply_kernels reported what it patched
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN
    assert losses[-1] < losses[0]
