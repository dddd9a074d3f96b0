"""metrics.jsonl, W&B offline and TensorBoard from the RunLogger callback; secrets never reach the tracker files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import TrainerState

from finetune.recipe.schema import Recipe
from finetune.run.records import read_metrics, redact, trim_metrics
from finetune.run.tracking import RunLogger, open_tracker

FAKE_TOKEN = "hf_" + "Zq7" * 10  # shaped like a Hugging Face token


def _log(logger: RunLogger, step: int, **values) -> None:
    state = TrainerState(global_step=step, max_steps=10)
    logger.on_log(None, state, None, logs=values)


def test_redact_masks_secret_keys_and_token_shaped_values():
    data = {"hub_token": "abc", "api_key": "k", "name": f"run {FAKE_TOKEN}", "nested": [{"password": "p"}],
            "revision": "0123456789abcdef0123456789abcdef01234567", "lr": 1e-4, "token_budget": None}
    out = redact(data)
    assert out["hub_token"] == out["api_key"] == out["nested"][0]["password"] == "<redacted>"
    assert out["name"] == "run <redacted>"
    kept = {"tokens_per_second": 1.5, "pad_token": "<|pad|>", "task_eval_max_new_tokens": 24, "num_tokens": 9}
    assert redact(kept) == kept  # counters and tokenizer fields are not secrets
    assert out["revision"] == data["revision"] and out["lr"] == 1e-4  # commit hashes and numbers stay
    assert out["token_budget"] is None  # nothing to hide


def test_metrics_rows_and_trim_after_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = RunLogger(path, "sft")
    logger.on_train_begin(None, TrainerState(global_step=0, max_steps=10), None)
    for step in (1, 2, 3, 4):
        _log(logger, step, loss=4.0 - step / 10, learning_rate=1e-3, num_tokens=100.0 * step, text="not a number")
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["stage"] == "sft" and "text" not in r and r["tokens_per_second"] > 0 for r in rows)
    with path.open("a") as f:
        f.write(json.dumps({"stage": "dpo", "step": 9, "loss": 1.0}) + "\n" + '{"stage": "sft", "st')  # killed mid-line
    assert trim_metrics(path, "sft", after_step=2) == 3  # steps 3, 4 and the broken line
    assert [(r["stage"], r["step"]) for r in read_metrics(path)] == [("sft", 1), ("sft", 2), ("dpo", 9)]


def test_resumed_logger_continues_the_token_count(tmp_path):
    logger = RunLogger(tmp_path / "m.jsonl", "sft")
    logger.resumed, logger.token_base = True, 500.0
    logger.on_train_begin(None, TrainerState(global_step=5, max_steps=10), None)
    _log(logger, 6, loss=1.0, num_tokens=100.0)  # the trainer's counter restarted at 0
    assert read_metrics(tmp_path / "m.jsonl")[0]["num_tokens"] == 600.0
    unknown = RunLogger(tmp_path / "n.jsonl", "sft")
    unknown.resumed = True  # no row at the checkpoint step: leave the total out rather than log a wrong one
    unknown.on_train_begin(None, TrainerState(global_step=5, max_steps=10), None)
    _log(unknown, 6, loss=1.0, num_tokens=100.0)
    assert "num_tokens" not in read_metrics(tmp_path / "n.jsonl")[0]


def test_tensorboard_events_hold_the_logged_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path / "metrics.jsonl", "sft")
    logger.tensorboard_dir = tmp_path / "tensorboard" / "sft"
    logger.on_train_begin(None, TrainerState(global_step=0, max_steps=10), None)
    for step in (1, 2, 3):
        _log(logger, step, loss=3.0 - step, grad_norm=0.5)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert "grad_norm" in events.Tags()["scalars"]


@pytest.fixture
def wandb_recipe(tmp_path, monkeypatch) -> Recipe:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", "wandb_v1_" + "x" * 30)
    return Recipe.model_validate({
        "name": "wb", "data": {"train": [{"path": "train.jsonl"}]},
        "tracking": {"wandb": {"project": "tests", "mode": "offline", "tags": ["unit"]}},
        "hub": {"repo_id": "someone/model"},
    })


def test_wandb_offline_writes_its_run_files_and_resumes_the_same_run(wandb_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = open_tracker(wandb_recipe, run_dir)
    logger = RunLogger(run_dir / "metrics.jsonl", "sft")
    logger.tracker = tracker
    logger.on_train_begin(None, TrainerState(global_step=0, max_steps=10), None)
    for step in (1, 2):
        _log(logger, step, loss=2.0 / step, learning_rate=1e-4)
    tracker.finish()
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_id"]
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    # wandb's service process may still be flushing the offline file when finish() returns: give it time.
    deadline = time.monotonic() + 30
    while b"sft/loss" not in files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"sft/loss" in files[0].read_bytes()  # the metrics went into the W&B run, namespaced by stage

    again = open_tracker(wandb_recipe, run_dir)  # a resumed run continues the same W&B run
    assert again.run.id == run_id
    again.finish()

    for path in Path(run_dir).rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert FAKE_TOKEN.encode() not in content and b"wandb_v1_xxxx" not in content, path
