"""SIGTERM (what schedulers and `docker stop` send): the step finishes, a checkpoint is saved, exit code 143; a DPO
stage stopped that way resumes to the same curve as an uninterrupted run."""

from __future__ import annotations

import json
import signal

import pytest
from resume_helpers import TermAtStep, losses, write_dpo_recipe, write_recipe

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
