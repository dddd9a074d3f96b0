"""Runs that lose nothing: Ctrl-C during the final evaluation, a full disk, a damaged newest checkpoint, a resumed
DPO stage, default checkpoints and a disk too small for them, each on the tiny model (in this process)."""

from __future__ import annotations

import errno
import json
import signal
from types import SimpleNamespace

import pytest
import torch
import transformers
from resume_helpers import TermAtStep, losses, train_here, write_dpo_recipe, write_recipe

import finetune.stages.common as common
from finetune.errors import RunInterrupted
from finetune.recipe.schema import load_recipe
from finetune.run import checkpoints
from finetune.run.records import read_metrics
from finetune.stages.pipeline import run_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stop_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    quiet = common.quiet_trainer
    monkeypatch.setattr(common, "quiet_trainer", lambda trainer: (quiet(trainer), trainer.add_callback(
        TermAtStep(step, signum))))


def end_rows(run_dir, stage: str = "sft") -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == stage and "train_runtime" in r]


def _interrupt_the_final_evaluation(path, addition_data, monkeypatch) -> None:
    """Give the recipe at `path` an eval set, run it with Ctrl-C in the evaluation after its last step; the real
    evaluation is back afterwards (for the resume)."""
    path.write_text(path.read_text().replace(f"{{path: {addition_data['train']}}}]",
                                             f"{{path: {addition_data['train']}}}], "
                                             f"eval: [{{path: {addition_data['eval']}}}]"))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(load_recipe(path))


def test_ctrl_c_in_the_final_evaluation_resumes_at_the_evaluation(tiny_model, addition_data, tmp_path, monkeypatch,
                                                                   capsys):
    path = write_recipe(tmp_path, tiny_model, addition_data["train"])  # no save_steps: the defaults
    run_dir = tmp_path / "runs" / "run"
    _interrupt_the_final_evaluation(path, addition_data, monkeypatch)
    output = capsys.readouterr().out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert "checkpoints every 30 min of training, at the end of each epoch (every 16 steps) and at the last " \
           "step (16); the newest 2 are kept; the next at step 16 or at" in output
    assert (run_dir / "sft" / "adapter" / "adapter_model.safetensors").exists()  # saved before the evaluation
    assert [p.name for p in checkpoints.list_checkpoints(run_dir / "sft" / "checkpoints")] == ["checkpoint-16"]
    resumed = train_here(str(path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "checkpoint-16" in resumed.output
    assert sorted(losses(run_dir)) == list(range(1, 17))  # not one step trained again
    metrics = json.loads((run_dir / "sft" / "summary.json").read_text())["metrics"]
    curve = losses(run_dir)
    assert metrics["train_loss"] == pytest.approx(sum(curve.values()) / 16, rel=1e-6)  # all 16 steps, not 0 of them
    assert "eval_loss" in metrics and len(end_rows(run_dir)) == 1


def test_ctrl_c_in_the_final_evaluation_of_a_max_steps_stage_trains_no_extra_step(tiny_model, addition_data,
                                                                                   tmp_path, monkeypatch):
    """max_steps ends the stage inside an epoch: the trainer, resumed at its last step, would train one more step
    before it checks the end (issue 33, item 2: `step 5/4`, a checkpoint-5 and another train_loss)."""
    path = write_recipe(tmp_path, tiny_model, addition_data["train"], max_steps=4)  # 16 steps make an epoch
    run_dir = tmp_path / "runs" / "run"
    _interrupt_the_final_evaluation(path, addition_data, monkeypatch)
    curve = losses(run_dir)
    assert sorted(curve) == [1, 2, 3, 4]
    resumed = train_here(str(path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "checkpoint-4" in resumed.output and "step 5/4" not in resumed.output
    assert losses(run_dir) == curve  # no step trained again or beyond
    assert [p.name for p in checkpoints.list_checkpoints(run_dir / "sft" / "checkpoints")] == ["checkpoint-4"]
    metrics = json.loads((run_dir / "sft" / "summary.json").read_text())["metrics"]
    assert metrics["steps"] == 4 and metrics["train_loss"] == pytest.approx(sum(curve.values()) / 4, rel=1e-6)
    assert "eval_loss" in metrics and len(end_rows(run_dir)) == 1


def test_resume_passes_over_a_damaged_checkpoint_and_keeps_the_books(tiny_model, addition_data, tmp_path,
                                                                     monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=4))
    run_dir = tmp_path / "runs" / "run"
    stop_at(monkeypatch, 6)
    with pytest.raises(RunInterrupted):
        run_pipeline(recipe)
    root = run_dir / "sft" / "checkpoints"
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]
    (root / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # damaged after it was written
    (root / ".trash-checkpoint-2").mkdir()  # a kill during rotation
    monkeypatch.undo()
    result = train_here(str(tmp_path / "run.yaml"), "--resume")
    assert result.exit_code == 0, result.output
    assert "checkpoint-6 is damaged (adapter_model.safetensors does not match the checksum" in result.output
    assert f"resuming from {root / 'checkpoint-4'}" in result.output
    assert not (root / ".trash-checkpoint-2").exists()
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 17))
    train_loss = json.loads((run_dir / "sft" / "summary.json").read_text())["metrics"]["train_loss"]
    assert train_loss == pytest.approx(sum(curve.values()) / 16, rel=1e-6)  # every step, not the resumed ones
    assert len(end_rows(run_dir)) == 1  # the interrupted attempt's end-of-training row is gone


def test_a_full_disk_ends_in_one_line_a_failed_status_and_no_temporaries(tiny_model, addition_data, tmp_path,
                                                                        monkeypatch):
    path = write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=4)
    run_dir = tmp_path / "runs" / "run"
    save = transformers.Trainer._save_optimizer_and_scheduler
    calls = []

    def full(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: half a file, then no space left
            (checkpoints.Path(output_dir) / "optimizer.pt").write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device", str(output_dir) + "/optimizer.pt")
        return save(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full)
    result = train_here(str(path))
    assert result.exit_code == 1
    message = [line for line in result.output.splitlines() if line.strip()]
    assert len(message) and "Traceback" not in result.output
    last = message[-1]
    assert last.startswith("error: [sft] disk full while writing ") and "optimizer.pt" in last
    assert f"last good checkpoint: {run_dir / 'sft' / 'checkpoints' / 'checkpoint-4'}" in last
    assert f"ft train {run_dir} --resume" in last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk full" in summary["error"]
    assert not list(run_dir.rglob(".staging")) and not list(run_dir.rglob(".*.tmp"))
    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", save)
    resumed = train_here(str(path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert sorted(losses(run_dir)) == list(range(1, 17))


def test_a_resumed_dpo_stage_logs_its_starting_evaluation_once(tiny_model, tmp_path, monkeypatch):
    path = write_dpo_recipe(tmp_path, tiny_model)
    path.write_text(path.read_text().replace("}], max_length", f"}}], eval: [{{path: {tmp_path / 'pairs.jsonl'}}}], "
                                                              "max_length"))
    recipe = load_recipe(path)
    stop_at(monkeypatch, 3)
    with pytest.raises(RunInterrupted):
        run_pipeline(recipe)
    monkeypatch.undo()
    run_pipeline(recipe, resume=True)
    rows = read_metrics(tmp_path / "runs" / "run" / "metrics.jsonl")
    assert len([r for r in rows if r.get("step") == 0 and "eval_loss" in r]) == 1
    assert len(end_rows(tmp_path / "runs" / "run", "dpo")) == 1
    summary = json.loads((tmp_path / "runs" / "run" / "dpo" / "summary.json").read_text())["metrics"]
    assert summary["eval_before"]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_the_first_step(tiny_model, addition_data, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: SimpleNamespace(free=100_000))
    result = train_here(str(write_recipe(tmp_path, tiny_model, addition_data["train"])))
    assert result.exit_code == 1 and "not enough free disk" in result.output and "3 checkpoint(s)" in result.output
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


def test_an_offline_wandb_run_holds_no_token_from_the_recipe_or_the_command_line(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from finetune.recipe.schema import validate_data
    from finetune.run.tracking import open_tracker

    hexkey, hf, wb = "0123abcd" * 5, "hf_" + "aB3" * 12, "wandb_v1_" + "Qw7" * 12
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr("sys.argv", ["ft", "train", "r.yaml", "--set", f"tracking.wandb.tags=[{hexkey}]",
                                     "--set", f"tracking.wandb.name=x-{hf}"])
    recipe = validate_data({"data": {"train": [{"path": "d.jsonl"}]}, "tracking": {"wandb": {
        "mode": "offline", "tags": [wb, hexkey], "name": f"x-{hf}"}}}, "recipe")
    open_tracker(recipe, tmp_path).finish()
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(token.encode() in data for token in (hexkey, hf, wb)), path
