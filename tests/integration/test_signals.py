"""SIGTERM (what schedulers and `docker stop` send): the step finishes, a checkpoint is saved, exit code 143."""

from __future__ import annotations

import json
import os
import signal

import pytest
from resume_helpers import losses, write_recipe
from transformers import TrainerCallback

import finetune.stages.sft as sft
from finetune.checkpoints import list_checkpoints
from finetune.guards import RunInterrupted
from finetune.recipe_io import load_recipe
from finetune.stages.pipeline import run_pipeline


class TermAtStep(TrainerCallback):
    """Sends SIGTERM to this process at the end of one step, like a cluster scheduler would at any moment."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_model, addition_data, tmp_path, monkeypatch):
    quiet = sft.quiet_trainer

    def quiet_and_terminated(trainer):
        quiet(trainer)
        trainer.add_callback(TermAtStep(3))

    monkeypatch.setattr(sft, "quiet_trainer", quiet_and_terminated)
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
