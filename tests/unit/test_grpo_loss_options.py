"""GRPO's loss choices in the recipe (`grpo.loss_type`, `importance_sampling`, `scale_rewards`) reach trl's
GRPOConfig under its own names, every value accepted by the installed trl, and a sequence-only loss with
token-level ratios is refused at validation."""

from __future__ import annotations

import typing

import pytest

from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import GRPOConfig, Recipe
from finetune.stages.grpo import loss_settings


@pytest.mark.parametrize("loss_type", typing.get_args(GRPOConfig.model_fields["loss_type"].annotation))
def test_every_loss_type_is_accepted_by_trl(loss_type):
    from trl import GRPOConfig as TrlGRPOConfig

    level = "sequence" if loss_type == "luspo" else "token"
    ours = GRPOConfig(loss_type=loss_type, importance_sampling=level, scale_rewards="none")
    config = TrlGRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], **loss_settings(ours))
    assert (config.loss_type, config.importance_sampling_level) == (loss_type, level)
    assert config.scale_rewards in ("none", False)


def test_gspo_is_sequence_level_importance_sampling():
    from trl import GRPOConfig as TrlGRPOConfig

    config = TrlGRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[],
                           **loss_settings(GRPOConfig(importance_sampling="sequence")))
    assert config.importance_sampling_level == "sequence" and config.loss_type == "dapo"


def test_luspo_needs_sequence_level_ratios():
    stage = {"name": "grpo", "kind": "grpo", "grpo": {"loss_type": "luspo", "rewards": [{"kind": "exact_match"}]}}
    with pytest.raises(RecipeError, match="importance_sampling: sequence"):
        Recipe(data={"train": [{"path": "x.jsonl"}]}, stages=[stage])
