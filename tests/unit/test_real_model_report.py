"""`scripts/real_model_report.py`: each run's row names what differed (targets, rows per training file, epochs)
and carries the stage's own figures."""

from __future__ import annotations

import json

import real_model_report
import yaml


def _run(tmp_path, name: str, targets, sources: dict[str, int], epochs: float = 1.0):
    run = tmp_path / name
    run.mkdir()
    recipe = {"lora": {"r": 8, "target_modules": targets}, "training": {"learning_rate": 3e-4, "epochs": epochs},
              "data": {"train": [{"path": f"data/{path}", "max_samples": n} for path, n in sources.items()]},
              "eval": {"max_forgetting": 0.05}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    metrics = {"task_before": {"exact_match": 0.0}, "task_after": {"exact_match": 0.52},
               "forgetting": {"loss_change": 0.041, "mean_kl": 0.06}, "stage_seconds": 700.0}
    (run / "summary.json").write_text(json.dumps({"stages": {"sft": {"metrics": metrics}}}))
    (run / "manifest.json").write_text(json.dumps({"command": ["ft", "train", "r.yaml", "--set", f"name={name}"]}))
    return run


def test_labels_name_targets_and_rows(tmp_path):
    mlp = real_model_report.rows_of(_run(tmp_path, "mlp", ["gate_proj", "up_proj", "down_proj"],
                                                    {"sft_train.jsonl": 2000, "replay.jsonl": 160}))
    attn = real_model_report.rows_of(_run(tmp_path, "attn", ["q_proj", "v_proj"], {"sft_train.jsonl": 1000}, epochs=2))
    every = real_model_report.rows_of(_run(tmp_path, "all", "all-linear", {"sft_train.jsonl": 1000}))
    assert mlp[0]["label"] == "SFT MLP, r8, lr 0.0003, 2000 sft_train + 160 replay x 1 ep"
    assert attn[0]["label"] == "SFT attention, r8, lr 0.0003, 1000 sft_train x 2 ep"
    assert every[0]["label"] == "SFT all-linear, r8, lr 0.0003, 1000 sft_train x 1 ep"
    assert (mlp[0]["after"], mlp[0]["loss_change"], mlp[0]["limit"]) == (0.52, 0.041, 0.05)


def test_table_lists_each_runs_command(tmp_path):
    rows = real_model_report.rows_of(_run(tmp_path, "mlp", ["gate_proj"], {"sft_train.jsonl": 1000}))
    text = real_model_report.table(rows)
    assert "| mlp | SFT MLP, r8, lr 0.0003, 1000 sft_train x 1 ep | 0% -> 52% | +0.041 | 0.060 | 700 s |" in text
    assert "- mlp: `ft train r.yaml --set name=mlp`" in text
