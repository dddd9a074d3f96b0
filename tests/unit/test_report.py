"""`ft report` draws the curves of a run (PNG files) and one HTML page that shows them."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.run.report import series, smooth

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for step in range(1, 31):
        rows.append({"stage": "sft", "step": step, "loss": 4 / step**0.5, "learning_rate": 1e-3 * (1 - step / 30),
                     "grad_norm": 1.0 / step, "tokens_per_second": 1000.0 + step})
        if step % 10 == 0:
            rows.append({"stage": "sft", "step": step, "eval_loss": 4.2 / step**0.5})
    for step in range(1, 11):
        rows.append({"stage": "dpo", "step": step, "loss": 0.69 - step / 50, "learning_rate": 5e-6,
                     "grad_norm": 2.0, "rewards/chosen": step / 10, "rewards/rejected": -step / 10,
                     "rewards/margins": step / 5, "rewards/accuracies": min(1.0, 0.5 + step / 20)})
    rows.append({"stage": "dpo", "step": 10, "eval_loss": 0.5, "eval_rewards/accuracies": 0.8,
                 "eval_rewards/margins": 1.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "name": "demo", "status": "finished",
        "stages": {"sft": {"kind": "sft", "metrics": {"train_loss": 1.1, "steps": 30}},
                   "dpo": {"kind": "dpo", "metrics": {"train_loss": 0.5, "steps": 10}}}}))
    return run


def test_report_draws_every_curve_and_links_them(run_dir):
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    folder = run_dir / "report"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == sorted([
        "sft-loss.png", "sft-learning_rate.png", "sft-grad_norm.png", "sft-tokens_per_second.png",
        "dpo-loss.png", "dpo-learning_rate.png", "dpo-grad_norm.png", "dpo-rewards.png", "dpo-reward_accuracy.png",
    ])  # no throughput chart for dpo (not logged), no reward charts for sft
    for png in folder.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, png  # a real chart, not an empty canvas
    page = (folder / "index.html").read_text()
    assert sorted(re.findall(r"<img src='([^']+)'", page)) == pngs
    assert "demo" in page and "finished" in page and "train_loss: 1.1" in page


def test_report_of_a_folder_without_metrics_says_so(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no metrics.jsonl" in result.output


def test_series_keeps_the_last_value_of_a_step_and_smoothing_is_debiased():
    rows = [{"step": 2, "loss": 1.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "x": 1}]
    assert series(rows, "loss") == ([1, 2], [3.0, 2.0])
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])  # a constant stays constant from step 1
    assert smooth([0.0, 10.0])[1] == pytest.approx(10 * 0.2 / (1 - 0.8**2))
