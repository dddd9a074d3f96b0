"""Recipe rules of the kto, orpo, simpo, cpo and grpo stages: each bad combination fails at load, before any model."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import load_recipe

DATA = "data: {train: [{path: x}]}\n"
SFT = "stages:\n  - {name: sft, kind: sft}\n"


def load(tmp_path: Path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(DATA + text)
    return load_recipe(path)


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load(tmp_path, text)
    return str(e.value)


def test_each_method_after_sft_is_valid_with_documented_defaults(tmp_path):
    r = load(tmp_path, SFT + "".join(f"  - {{name: {k}, kind: {k}}}\n" for k in ("kto", "orpo", "simpo", "cpo"))
             + "  - {name: grpo, kind: grpo, grpo: {rewards: [{kind: exact_match}]}}\n")
    kto, orpo, simpo, cpo, grpo = r.stages[1:]
    assert (kto.kto.reference, kto.kto.beta) == ("sft", 0.1)
    assert (simpo.simpo.beta, simpo.simpo.gamma, simpo.simpo.nll_weight) == (2.0, 0.5, 0.0)
    assert (cpo.cpo.loss_type, cpo.cpo.nll_weight) == ("sigmoid", 1.0)
    assert grpo.grpo.rewards[0].kind == "exact_match" and grpo.grpo.num_generations == 4


@pytest.mark.parametrize("kind", ["orpo", "simpo", "cpo"])
def test_reference_free_methods_refuse_a_reference_key(tmp_path, kind):
    msg = problems(tmp_path, SFT + f"  - {{name: a, kind: {kind}, {kind}: {{reference: sft}}}}\n")
    assert f"stages[1].{kind}" in msg and f"{kind} is reference-free" in msg and "remove `reference`" in msg


def test_grpo_without_a_reward_is_refused(tmp_path):
    msg = problems(tmp_path, SFT + "  - {name: rl, kind: grpo}\n")
    assert "stages[1] (rl): a grpo stage needs at least one reward under grpo.rewards" in msg


def test_reward_fields_follow_their_kind(tmp_path):
    msg = problems(tmp_path, SFT + "  - name: rl\n    kind: grpo\n    grpo:\n      rewards:\n"
                   "        - {kind: regex}\n        - {kind: length, max_words: 3, pattern: x}\n"
                   "        - {kind: format, pattern: '(['}\n        - {kind: python, function: not a path}\n")
    assert "a regex reward needs `pattern`" in msg
    assert "`pattern` does not apply to a length reward" in msg
    assert "not a valid regular expression" in msg
    assert "rewards[3].function" in msg or "grpo.rewards.3.function" in msg


def test_grpo_batch_must_hold_whole_groups(tmp_path):
    msg = problems(tmp_path, SFT + "  - {name: rl, kind: grpo, training: {micro_batch_size: 6}, "
                   "grpo: {num_generations: 4, rewards: [{kind: exact_match}]}}\n")
    assert "(6) counts completions and must be a multiple of grpo.num_generations (4)" in msg


def test_kto_needs_two_rows_per_micro_batch(tmp_path):
    msg = problems(tmp_path, SFT + "  - {name: k, kind: kto, training: {micro_batch_size: 1}}\n")
    assert "kto needs training.micro_batch_size of 2 or more" in msg


@pytest.mark.parametrize("kind", ["kto", "grpo"])
def test_sft_reference_needs_an_adapter_to_start_from(tmp_path, kind):
    extra = ", grpo: {rewards: [{kind: exact_match}]}" if kind == "grpo" else ""
    msg = problems(tmp_path, f"stages:\n  - {{name: a, kind: {kind}{extra}}}\n")
    assert f"{kind}.reference is 'sft' but there is no SFT adapter to start from" in msg
    load(tmp_path, f"stages:\n  - {{name: a, kind: {kind}{extra.replace('{rewards', '{reference: base, rewards')}"
         + (", kto: {reference: base}" if kind == "kto" else "") + "}\n")


def test_settings_of_another_method_are_refused(tmp_path):
    msg = problems(tmp_path, SFT + "  - {name: o, kind: orpo, simpo: {gamma: 1.0}}\n")
    assert "stages[1] (o): the simpo settings apply to simpo stages only" in msg


def test_packing_is_refused_for_alignment_stages(tmp_path):
    msg = problems(tmp_path, SFT + "  - {name: o, kind: orpo, data: {train: [{path: x}], packing: true}}\n")
    assert "packing applies to SFT only; set data.packing: false for orpo stages" in msg


def test_python_reward_that_cannot_be_imported_is_named_by_preflight(tmp_path, monkeypatch):
    from finetune.stages.preflight import check_recipe_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrewards.py").write_text("def brevity(prompts, completions, answers, **columns):\n    return []\n")
    r = load(tmp_path, SFT + "  - name: rl\n    kind: grpo\n    grpo:\n      rewards:\n"
             "        - {kind: python, function: 'myrewards:brevity'}\n"
             "        - {kind: python, function: 'myrewards:missing'}\n"
             "        - {kind: python, function: 'nosuchmodule_xyz:f'}\n")
    found = [p for p in check_recipe_paths(r) if "rewards" in p]
    assert len(found) == 2
    assert (f"rewards[1].function: reward function myrewards:missing: {tmp_path / 'myrewards.py'} defines no "
            "function 'missing' at its top level") in found[0]
    assert "no module 'nosuchmodule_xyz'" in found[1]
    assert "myrewards" not in __import__("sys").modules  # found and read, never imported (issue 33 item 5)


@pytest.mark.parametrize("desirable, undesirable, weights, words", [
    (40, 0, (1.0, 1.0), "all 40 answers are desirable and none undesirable (label: false)"),
    (0, 12, (1.0, 1.0), "all 12 answers are undesirable and none desirable (label: true)"),
    (30, 10, (1.0, 1.0), "set kto.desirable_weight in [0.33, 0.44] or kto.undesirable_weight in [2.26, 3.00]"),
    (30, 10, (0.4, 1.0), None),
    (20, 20, (1.0, 1.0), None),
])
def test_kto_label_balance_is_said(desirable, undesirable, weights, words):
    """Issue 33 item 14: one kind of label only is a clear warning; an imbalance says trl's weight range."""
    from finetune.recipe.schema import KTOConfig
    from finetune.stages.kto import label_balance_warning

    got = label_balance_warning([True] * desirable + [False] * undesirable,
                                KTOConfig(desirable_weight=weights[0], undesirable_weight=weights[1]))
    assert (got is None) if words is None else (words in got)


def test_kto_with_desirable_labels_only_is_warned_before_training(tmp_path, tiny_model, capsys):
    """`ft train` tokenizes every stage's data first (check_stage_data): the warning comes before any stage trains."""
    from finetune.model.loading import load_tokenizer
    from finetune.stages.preflight import check_stage_data

    rows = tmp_path / "kto.jsonl"
    rows.write_text('{"prompt": "1+1=", "completion": "2", "label": true}\n' * 6)
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: [{{path: {rows}}}]}}\n"
                    "stages:\n  - {name: k, kind: kto, kto: {reference: base}}\n")
    recipe = load_recipe(path)
    assert check_stage_data(recipe, load_tokenizer(recipe.model), recipe.stages) == []
    out = capsys.readouterr().out
    assert "[preflight] stage k: warning: all 6 answers are desirable and none undesirable (label: false)" in out
