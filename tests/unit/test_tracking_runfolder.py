"""The run folder's rules (overwrite, resume, locks, writability, disk) and atomic checkpoints (written by a real
transformers Trainer on the tiny model), without training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.run import checkpoints
from finetune.run.listing import list_runs, run_info
from finetune.run.lock import RunLock, is_locked
from finetune.run.resume import check_run_dir, check_writable, recipe_differences

RECIPE = "name: r\ntraining:\n  learning_rate: 0.001\n  seed: 1\noutput:\n  dir: runs/r\n"


def make_run(run_dir: Path, status: str, checkpoint_steps: tuple[int, ...] = (), rows: int = 0) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(RECIPE)
    (run_dir / "summary.json").write_text(json.dumps({"name": "r", "status": status, "stages": {}}))
    for step in checkpoint_steps:
        folder = run_dir / "sft" / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, rows + 1):
            f.write(json.dumps({"stage": "sft", "step": step, "loss": 3.0 - step / 10}) + "\n")
    return run_dir


def rules(run_dir: Path, recipe: str = RECIPE, overwrite=False, resume=False, from_stage=None) -> None:
    check_run_dir(run_dir, recipe, ["sft"], overwrite=overwrite, resume=resume, from_stage=from_stage)


def test_interrupted_run_with_checkpoint_needs_resume_or_overwrite(tmp_path):
    run = make_run(tmp_path / "run", "interrupted", checkpoint_steps=(10, 20))
    with pytest.raises(FinetuneError, match=r"stopped at step 20 and has a checkpoint.*--resume"):
        rules(run)
    rules(run, resume=True)  # same recipe: fine
    with pytest.raises(FinetuneError, match=r"these keys differ: training\.learning_rate"):
        rules(run, RECIPE.replace("0.001", "0.002"), resume=True)
    rules(run, RECIPE.replace("runs/r", "elsewhere"), resume=True)  # where the run lives is not what it trains
    rules(run, overwrite=True)
    assert not run.exists()  # started over


def test_resume_needs_an_unfinished_run(tmp_path):
    with pytest.raises(FinetuneError, match="holds no run to resume"):
        rules(tmp_path / "nothing", resume=True)
    done = make_run(tmp_path / "done", "finished")
    with pytest.raises(FinetuneError, match="already finished; nothing to resume"):
        rules(done, resume=True)


def test_recipe_differences_lists_changed_keys(tmp_path):
    run = make_run(tmp_path / "run", "running")
    changed = RECIPE.replace("seed: 1", "seed: 2").replace("name: r", "name: q")
    assert recipe_differences(run, changed) == ["name", "training.seed"]


def test_unwritable_output_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(FinetuneError, match=r"output.dir .*a-file is a file, not a folder"):
        check_writable(blocker / "runs" / "x")
    check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and nothing was created
    assert not (tmp_path / "new").exists()


def test_too_little_disk_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: SimpleNamespace(free=50 * 2**20))
    need = 3 * checkpoints.checkpoint_bytes(40_000_000, "adamw_torch")  # 3 checkpoints of a 40M-parameter adapter
    with pytest.raises(FinetuneError, match=r"not enough free disk .* 50 MB is free"):
        checkpoints.check_free_disk(tmp_path / "run", need, "3 checkpoints")
    checkpoints.check_free_disk(tmp_path / "run", 10 * 2**20, "1 checkpoint")


def test_a_run_folder_in_use_is_not_touched(tmp_path):
    run = make_run(tmp_path / "run", "running", checkpoint_steps=(5,))
    hold = (f"import sys; from finetune.run.lock import RunLock; lock = RunLock({str(run)!r}).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_locked(run) and run_info(run)["status"] == "running"
        with pytest.raises(FinetuneError, match=f"in use by another `ft train` \\(pid {holder.pid}\\)"):
            rules(run, overwrite=True)
        assert run.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    assert not is_locked(run)
    assert run_info(run)["status"] == "crashed"  # said "running", nobody holds the lock: it died


def test_ft_runs_lists_status_step_loss_and_eval(tmp_path):
    make_run(tmp_path / "a", "finished", rows=12)
    b = make_run(tmp_path / "b", "running", rows=3)
    with (b / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "sft", "step": 3, "eval_loss": 2.5}) + "\n")
    lock = RunLock(b).acquire()
    try:
        table = list_runs(tmp_path)
    finally:
        lock.release()
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert lines[str(tmp_path / "a")][1:5] == ["finished", "sft", "12", "1.8000"]
    assert lines[str(tmp_path / "b")][1:5] == ["running", "sft", "3", "2.7000"]
    assert "eval loss 2.5000" in table
    assert json.loads(list_runs(tmp_path, as_json=True))[0]["run"] in (str(tmp_path / "a"), str(tmp_path / "b"))
    out = CliRunner().invoke(app, ["runs", str(tmp_path)])  # b's lock is released now: it died without a word
    assert out.exit_code == 0 and "crashed" in out.output and "finished" in out.output


@pytest.fixture
def real_trainer(tiny_model, tmp_path):
    """A transformers Trainer on the tiny fixture model, with the optimizer and scheduler `_save_checkpoint` saves."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), save_total_limit=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    return trainer


def test_atomic_checkpoints_rotate_and_survive_a_failed_write(real_trainer, monkeypatch):
    trainer, root = real_trainer, Path(real_trainer.args.output_dir)
    checkpoints.make_atomic(trainer)
    for step in (5, 10, 15):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, None)
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-10", "checkpoint-15"]
    files = {p.name for p in (root / "checkpoint-15").iterdir()}  # what `train(resume_from_checkpoint=...)` reads
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert json.loads((root / "checkpoint-15" / "trainer_state.json").read_text())["global_step"] == 15

    def disk_full(output_dir):  # weights, optimizer and scheduler are written by now; the RNG and trainer state not
        raise OSError("disk full")

    trainer.state.global_step = 20
    with monkeypatch.context() as m:
        m.setattr(trainer, "_save_rng_state", disk_full)
        with pytest.raises(OSError, match="disk full"):
            trainer._save_checkpoint(trainer.model, None)
    assert (root / checkpoints.STAGING / "checkpoint-20" / "optimizer.pt").exists()  # it failed half-way through
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-10", "checkpoint-15"]
    assert not (root / "checkpoint-20").exists()
    assert checkpoints.last_checkpoint(root).name == "checkpoint-15"
    trainer._save_checkpoint(trainer.model, None)  # the leftovers of the failed write are cleared, then it works
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-15", "checkpoint-20"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-15", "checkpoint-20"]
