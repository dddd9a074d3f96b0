"""`ft train --dry-run`: loads tokenizer, data and model, prints samples, tokens, steps and memory; trains nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from resume_helpers import train_here, write_recipe

from finetune.recipe.schema import LoraConfig, TrainingConfig
from finetune.stages.dryrun import estimate_memory, total_steps


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, addition_data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], max_steps=None, epochs=2,
                          gradient_accumulation_steps=2)
    result = train_here(str(recipe), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: nothing is trained" in out
    assert "«" in out and "<|im_start|>user" in out  # one rendered sample, trained tokens marked
    # 64 rows, micro batch 4 x accumulation 2 = 8 steps per epoch, 2 epochs
    assert "= 8 steps per epoch -> 16 steps (2.00 epochs)" in out
    assert "memory for 4 x " in out and "plan: 1 stage(s), 16 optimizer steps" in out
    assert not (tmp_path / "runs").exists()


def test_step_count_matches_the_trainer_rounding():
    t = TrainingConfig(micro_batch_size=4, gradient_accumulation_steps=3, epochs=1.5)
    # 50 rows -> 13 micro batches -> 5 steps per epoch (the last one with 1 micro batch) -> ceil(7.5) = 8
    assert total_steps(50, t) == 8
    assert total_steps(50, TrainingConfig(max_steps=3)) == 3


def test_activation_estimate_matches_the_tensors_autograd_keeps(tmp_path):
    """The estimate against what the forward actually saves for backward (tensors counted once by storage)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tinymodels import build_char_model
    from transformers import AutoModelForCausalLM

    from finetune.model.adapters import attach, prepare_base

    folder = build_char_model(tmp_path / "m", hidden=128, layers=3)
    model = attach(prepare_base(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), False),
                   LoraConfig(r=8))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(5, 90, (4, 96))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    measured = sum(saved.values())
    estimate = estimate_memory(model, TrainingConfig(), 4, 96, act_bytes=4)
    assert 0.8 * measured <= estimate.activations + estimate.logits <= 1.25 * measured, (estimate, measured)
