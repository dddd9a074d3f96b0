"""Early stopping and keep-best decisions, the recipe rules that guard them, the W&B samples table and `ft eval`'s
table, without training (the end-to-end run is tests/integration/test_eval.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.eval.table import format_table
from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import EarlyStoppingConfig, Recipe
from finetune.run.tracking import Tracker
from finetune.stages.watch import EvalWatch, improved


def test_improved_knows_which_way_is_better():
    assert improved(1.0, None, "eval_loss")
    assert improved(0.9, 1.0, "eval_loss") and not improved(0.95, 1.0, "eval_loss", min_delta=0.1)
    assert improved(0.6, 0.5, "task_exact_match") and not improved(0.5, 0.6, "task_exact_match")


def _watch(early=None, keep_best=None) -> EvalWatch:
    watch = EvalWatch.__new__(EvalWatch)  # the decisions only: no run folder, no model
    watch.ctx = SimpleNamespace(stage=SimpleNamespace(name="sft"))
    watch.early, watch.keep_best, watch.early_best, watch.bad_evals, watch.stopped_at = early, keep_best, None, 0, None
    return watch


def test_early_stopping_after_patience_evaluations_without_improvement():
    watch = _watch(EarlyStoppingConfig(metric="eval_loss", patience=2, min_delta=0.01))
    control = SimpleNamespace(should_training_stop=False)
    for step, loss in [(2, 1.0), (4, 0.8), (6, 0.795), (8, 0.9)]:  # 0.795 is within min_delta: no improvement
        watch._early_stop({"eval_loss": loss}, SimpleNamespace(global_step=step), control)
        if step < 8:
            assert not control.should_training_stop, step
    assert control.should_training_stop and watch.stopped_at == 8 and watch.early_best == 0.8


def test_recipe_rules_for_early_stopping_and_keep_best(tmp_path):
    data = {"train": [{"path": "x.jsonl"}]}
    with pytest.raises(RecipeError, match="early_stopping needs training.eval_steps"):
        Recipe(data=data | {"eval_fraction": 0.1}, training={"early_stopping": {"metric": "eval_loss"}})
    with pytest.raises(RecipeError, match="keep_best watches 'task_exact_match', which needs data.task_eval"):
        Recipe(data=data | {"eval_fraction": 0.1}, training={"eval_steps": 5, "keep_best": "task_exact_match"})
    with pytest.raises(RecipeError, match="metric 'accuracy' is not one a stage computes"):
        Recipe(data=data | {"eval_fraction": 0.1}, training={"eval_steps": 5, "keep_best": "accuracy"})
    with pytest.raises(RecipeError, match="needs eval data"):
        Recipe(data=data, training={"eval_steps": 5, "keep_best": "eval_loss"})
    Recipe(data=data | {"eval_fraction": 0.1}, training={"eval_steps": 5, "keep_best": "eval_loss",
                                                          "early_stopping": {"patience": 2}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {train: [{path: x.jsonl}]}\neval: {tasks: [{path: t.jsonl, metrics: [bleu]}]}\n")
    with pytest.raises(RecipeError, match=r"eval\.tasks\[0\]\.metrics\[0\] \(line 2\).*got 'bleu'"):
        Recipe.from_yaml(recipe)


def test_samples_go_to_wandb_as_a_table_without_secrets():
    logged = []
    tracker = Tracker(SimpleNamespace(log=logged.append))
    secret = "hf_" + "Zq7" * 10
    tracker.log_table("sft", "samples", ["step", "prompt", "generated"], [[2, "q", "a"], [2, "q2", secret]])
    table = logged[0]["sft/samples"]
    assert table.columns == ["step", "prompt", "generated"]
    assert table.data[0] == [2, "q", "a"] and secret not in str(table.data)


def test_table_side_by_side_with_difference_and_marks():
    target = {"heldout": {"loss": 1.25, "perplexity": 3.49}, "tasks": {"d/t.jsonl": {"exact_match": 0.75, "rows": 4}},
              "forgetting": {"loss_change": 0.3, "mean_kl": 0.1, "max_forgetting": 0.2, "over_limit": True}}
    other = {"heldout": {"loss": 2.0, "perplexity": 7.39}, "tasks": {"d/t.jsonl": {"exact_match": 0.25}}}
    text = format_table({"target": target, "against": other, "comparison": {"kl_refused": "the tokenizers differ"}})
    assert "task t.jsonl exact_match  0.7500  0.2500   +0.5000" in text
    assert "heldout loss" in text and "-0.7500" in text
    assert "KL comparison refused: the tokenizers differ" in text
    assert "target: FORGETTING, forgetting: general-text loss +0.3000 > 0.2 allowed" in text
