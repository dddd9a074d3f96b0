"""4-bit experts end to end (issue 30): a tiny Qwen3-MoE and a tiny Mixtral trained as QLoRA with
`quantization.experts: true`: the dry run and the banner count the experts as 4-bit and the trainable parameters by
group, the dry run prints the expert load, the loss falls, and the merged export (into the dequantized weights,
experts included) is verified."""

from __future__ import annotations

import json

import pytest
from build_fixture_models import build, task_rows
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_qlora_with_4bit_experts_trains_and_exports_merged(tmp_path, family):
    model = build(family, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a, _ in task_rows(32)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: moe-4bit
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32, experts: true}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {data}}}], max_length: 64}}
training: {{max_steps: 12, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0}}
output: {{dir: {tmp_path / 'run'}}}
""")
    validated = runner.invoke(app, ["validate", str(recipe)]).output
    assert "--merge-into dequantized" not in validated, validated  # attention-only adapters: the default merge
    dry = runner.invoke(app, ["train", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "experts 0, router 0" in dry.output and "expert load on 16 training rows" in dry.output
    from finetune.stages.memory import gb, nf4_bytes

    experts = 2 * 4 * 3 * 64 * (32 if family == "qwen3-moe" else 128)  # layers x experts x 3 x hidden x expert size
    line = next(x for x in dry.output.splitlines() if "memory for" in x)
    assert f"expert weights {gb(nf4_bytes(experts, True))}" in line, line  # float32 would be 4 x experts bytes
    assert "(quantization nf4, experts in NF4)" in dry.output
    out = runner.invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    assert "experts: 4 fused expert weights in NF4" in out.output and "experts 0, router 0" in out.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert any("aux_loss" in r for r in rows), rows[0]  # the router's load-balancing loss, logged by trl
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    out = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "merged"])
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "run" / "export" / "sft-merged" / "export.json").read_text())
    assert meta["verification"]["dequantized"]["mean_kl"] < 1e-4, meta["verification"]
    config = json.loads((tmp_path / "run" / "export" / "sft-merged" / "config.json").read_text())
    assert "finetune_experts" not in json.dumps(config)
    card = (tmp_path / "run" / "export" / "sft-merged" / "README.md").read_text()
    assert "on a NF4 4-bit base (QLoRA, the experts in NF4 too: finetune's quantization.experts)" in card
