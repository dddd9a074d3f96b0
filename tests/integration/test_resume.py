"""Runs survive crashes and Ctrl-C: resumed loss curves match an uninterrupted run step for step.

A real `ft train` child process on the tiny fixture model is killed with SIGKILL mid-run (in an SFT stage and in a
DPO stage), and another one while it writes a checkpoint; Ctrl-C is sent to `ft train` running in this process.
Each run is then continued with `ft train --resume` and its per-step losses compared with an uninterrupted run of
the same recipe. The children run with one thread, and so does this process during these tests: the curves agree
to float rounding (tolerance 1e-6).
"""

from __future__ import annotations

import json
import signal
import textwrap

import pytest
import torch
from resume_helpers import (
    MAX_STEPS,
    TermAtStep,
    assert_same_curve,
    losses,
    spawn,
    spawn_paused,
    subprocess_env,
    train_here,
    wait_for_step,
    write_dpo_recipe,
    write_recipe,
)

from finetune.run.checkpoints import last_checkpoint, list_checkpoints


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here as in the children, so every run computes bit for bit the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_model, addition_data, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(folder, tiny_model, addition_data["train"], save_steps=4)
    result = train_here(str(recipe))
    assert result.exit_code == 0, result.output
    curve = losses(folder / "runs" / "run")
    assert len(curve) == MAX_STEPS
    return curve


def test_kill_9_mid_run_then_resume_matches(reference, tiny_model, addition_data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=4)
    run_dir = tmp_path / "runs" / "run"
    proc = spawn(["train", str(recipe)], cwd=tmp_path)
    wait_for_step(run_dir, 6, proc)  # checkpoint-4 exists; steps 5-6 are work the kill throws away
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"{out[-2000:]}\n{err[-2000:]}"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # nobody got to say otherwise
    assert not (run_dir / "sft" / "summary.json").exists()
    saved = last_checkpoint(run_dir / "sft" / "checkpoints")
    assert saved is not None and saved.name in ("checkpoint-4", "checkpoint-8"), (saved, out[-2000:])

    plain = train_here(str(recipe))  # the same command without --resume does not silently start over
    assert plain.exit_code == 1 and "--resume" in plain.output

    result = train_here(str(recipe), "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming from {saved}" in result.output
    assert_same_curve(losses(run_dir), reference, tol=1e-6)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


DIE_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    import transformers
    write_rng = transformers.Trainer._save_rng_state

    def die_at_step_8(self, output_dir):
        # adapter, optimizer and scheduler of checkpoint-8 are on disk by now; the RNG and trainer state are not
        if self.state.global_step == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        write_rng(self, output_dir)

    transformers.Trainer._save_rng_state = die_at_step_8
    from finetune.cli import main
    sys.argv = ["ft", *sys.argv[1:]]
    main()
""")


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tiny_model, addition_data, tmp_path):
    import subprocess
    import sys

    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=4)
    run_dir = tmp_path / "runs" / "run"
    root = run_dir / "sft" / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, "train", str(recipe)], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (root / ".staging" / "checkpoint-8" / "optimizer.pt").exists()  # it died half-way through the write
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-4"]
    assert not (root / "checkpoint-8").exists()
    state = json.loads((root / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    result = train_here(str(run_dir), "--resume")  # the run folder stands for its recipe
    assert result.exit_code == 0, result.output
    assert_same_curve(losses(run_dir), reference, tol=1e-6)
    assert not (root / ".staging").exists()
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-12", "checkpoint-16"]  # save_total_limit 2


def test_ctrl_c_finishes_the_step_saves_and_resumes(reference, tiny_model, addition_data, tmp_path, monkeypatch):
    import finetune.stages.common as common

    quiet = common.quiet_trainer  # Ctrl-C arrives at the end of step 3 (in this process: `ft train` through typer)
    monkeypatch.setattr(common, "quiet_trainer", lambda t: (quiet(t), t.add_callback(TermAtStep(3, signal.SIGINT))))
    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"])  # no save_steps: only Ctrl-C saves
    run_dir = tmp_path / "runs" / "run"
    result = train_here(str(recipe))
    assert result.exit_code == 130, result.output
    assert "SIGINT received: finishing the current step" in result.output
    assert f"Continue with: ft train {run_dir} --resume" in result.output
    assert [p.name for p in list_checkpoints(run_dir / "sft" / "checkpoints")] == ["checkpoint-3"]
    assert sorted(losses(run_dir)) == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_in"] == "sft"

    monkeypatch.setattr(common, "quiet_trainer", quiet)
    result = train_here(str(recipe), "--resume")
    assert result.exit_code == 0, result.output
    assert_same_curve(losses(run_dir), reference, tol=1e-6)


def test_kill_9_in_the_dpo_stage_then_resume_matches(tiny_model, tmp_path):
    reference_run = tmp_path / "reference" / "runs" / "run"
    result = train_here(str(write_dpo_recipe(tmp_path / "reference", tiny_model, save_steps=2)))
    assert result.exit_code == 0, result.output
    reference = losses(reference_run, "dpo")
    assert sorted(reference) == list(range(1, 9))

    recipe = write_dpo_recipe(tmp_path / "killed", tiny_model, save_steps=2)
    run_dir = tmp_path / "killed" / "runs" / "run"
    proc = spawn_paused(["train", str(recipe)], cwd=tmp_path, after_step=5)  # returns when it waits before step 6
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"{out[-2000:]}\n{err[-2000:]}"
    assert sorted(losses(run_dir, "dpo")) == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # nobody got to say otherwise
    saved = last_checkpoint(run_dir / "dpo" / "checkpoints")
    assert saved is not None and saved.name == "checkpoint-4"  # step 5 is logged but saved nowhere: lost work

    result = train_here(str(run_dir), "--resume")
    assert result.exit_code == 0, result.output
    assert f"[dpo] resuming from {saved}" in result.output
    resumed = losses(run_dir, "dpo")  # step 5 logged once: the killed run's row was dropped, then redone
    assert sorted(resumed) == sorted(reference)
    assert max(abs(resumed[s] - reference[s]) for s in reference) <= 1e-6, (resumed, reference)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
