"""SIGTERM (what schedulers and `docker stop` send): the step finishes, a checkpoint is saved, exit code 143; a DPO
stage stopped that way resumes to the same curve as an uninterrupted run. A second Ctrl-C or SIGTERM stops at once,
without the checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from resume_helpers import TermAtStep, losses, subprocess_env, write_dpo_recipe, write_recipe

import finetune
import finetune.stages.common as common
from finetune.errors import RunInterrupted
from finetune.recipe.schema import load_recipe
from finetune.run.checkpoints import list_checkpoints
from finetune.stages.pipeline import run_pipeline


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_model, addition_data, tmp_path, monkeypatch):
    quiet = common.quiet_trainer

    def quiet_and_terminated(trainer):
        quiet(trainer)
        trainer.add_callback(TermAtStep(3))

    monkeypatch.setattr(common, "quiet_trainer", quiet_and_terminated)
    before = signal.getsignal(signal.SIGTERM)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=10))
    with pytest.raises(RunInterrupted) as caught:
        run_pipeline(recipe)
    run_dir = tmp_path / "runs" / "run"
    assert caught.value.exit_code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at step 3; checkpoint saved in {run_dir}/sft/checkpoints/checkpoint-3" in str(
        caught.value)
    assert f"ft train {run_dir} --resume" in str(caught.value)
    assert [p.name for p in list_checkpoints(run_dir / "sft" / "checkpoints")] == ["checkpoint-3"]
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back after training


def test_dpo_stage_stopped_by_sigterm_resumes_to_the_same_curve(tiny_model, tmp_path, monkeypatch):
    reference_dir = tmp_path / "reference"
    run_pipeline(load_recipe(write_dpo_recipe(reference_dir, tiny_model)))
    reference = losses(reference_dir / "runs" / "run", "dpo")
    assert sorted(reference) == list(range(1, 9))

    quiet = common.quiet_trainer
    monkeypatch.setattr(common, "quiet_trainer", lambda trainer: (quiet(trainer), trainer.add_callback(TermAtStep(3))))
    recipe = load_recipe(write_dpo_recipe(tmp_path / "stopped", tiny_model))
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM at step 3"):
        run_pipeline(recipe)
    monkeypatch.setattr(common, "quiet_trainer", quiet)
    finetune.train(recipe, resume=True)  # the Python API; dpo continues from its checkpoint at step 3
    resumed = losses(tmp_path / "stopped" / "runs" / "run", "dpo")
    assert sorted(resumed) == sorted(reference)
    assert max(abs(resumed[s] - reference[s]) for s in reference) <= 1e-5, (resumed, reference)


#: `ft train ARGS` in a child that receives the signal `SIGNAL` (env) twice at the end of step 3, the second while
#: the first is still asking the trainer to finish the step and save.
TWICE_AT_STEP_3 = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    import finetune.stages.common as common

    class Twice(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                for _ in range(2):
                    os.kill(os.getpid(), int(os.environ["SIGNAL"]))

    quiet = common.quiet_trainer
    common.quiet_trainer = lambda trainer: (quiet(trainer), trainer.add_callback(Twice()))
    from finetune.cli import main
    sys.argv = ["ft", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_second_signal_stops_at_once_without_a_checkpoint(tiny_model, addition_data, tmp_path, signum, code):
    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=10)
    run_dir = tmp_path / "runs" / "run"
    proc = subprocess.run([sys.executable, "-c", TWICE_AT_STEP_3, "train", str(recipe)], cwd=tmp_path, timeout=600,
                          env={**subprocess_env(), "SIGNAL": str(int(signum))}, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    name = signal.Signals(signum).name
    assert out.count(f"{name} received: finishing the current step") == 1  # the first one was caught
    assert "checkpoint saved" not in out and "Continue with" not in out
    assert not list_checkpoints(run_dir / "sft" / "checkpoints")  # the step-3 checkpoint of one signal: not written
    assert sorted(losses(run_dir)) == [1, 2]  # stopped inside step 3, before it was logged
    if signum == signal.SIGINT:  # KeyboardInterrupt, recorded in the summary; a second SIGTERM kills outright
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
