"""A NaN loss stops the run before the optimizer applies it, naming the step, the last good checkpoint and causes."""

from __future__ import annotations

import json

import pytest
import torch
from resume_helpers import losses, write_recipe

import finetune.stages.sft as sft
from finetune.recipe.schema import load_recipe
from finetune.run.guards import TrainingDiverged
from finetune.stages.pipeline import run_pipeline

POISONED_FORWARD = 6  # the 6th training forward = step 6 (micro batch 4, no accumulation)


def test_nan_loss_stops_with_step_checkpoint_and_causes(tiny_model, addition_data, tmp_path, monkeypatch):
    load = sft.load_model
    forwards = {"n": 0}

    def load_with_nan(*args, **kwargs):
        model = load(*args, **kwargs)

        def poison(module, inputs, output):
            if module.training:
                forwards["n"] += 1
                if forwards["n"] == POISONED_FORWARD:
                    return output * float("nan")
            return output

        model.get_input_embeddings().register_forward_hook(poison)  # NaN in, NaN loss out
        return model

    monkeypatch.setattr(sft, "load_model", load_with_nan)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, addition_data["train"], save_steps=4))
    with pytest.raises(TrainingDiverged) as caught:
        run_pipeline(recipe)
    message = str(caught.value)
    run_dir = tmp_path / "runs" / "run"
    good = run_dir / "sft" / "checkpoints" / "checkpoint-4"
    assert "stopped at step 6: the gradients are NaN or infinite" in message
    assert "The optimizer step was not applied" in message
    assert f"Last good checkpoint: {good}" in message and "ft train" in message and "--resume" in message
    assert "learning rate too high (training.learning_rate is 0.01" in message
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]  # step 6 was never logged: no NaN in the record
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 6" in summary["error"]

    from safetensors.torch import load_file

    weights = load_file(str(good / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
