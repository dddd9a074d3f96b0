"""GRPO rewards: the built-in kinds score what their docs say, user functions get the documented arguments, and
every failure names the function and the sample."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.eval.tasks import normalize_answer
from finetune.recipe.schema import GRPOConfig, RewardSpec
from finetune.stages.rewards import build_rewards, check_reward_data, make_reward

PROMPTS = [[{"role": "user", "content": "What pet does Ann have?"}]] * 3


def call(spec: dict, texts: list[str], **columns):
    reward = make_reward(RewardSpec(**spec))
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # trl's conversational completions
    return reward(prompts=PROMPTS[: len(texts)], completions=completions, completion_ids=[[0]] * len(texts),
                  trainer_state=None, log_extra=None, log_metric=None, **columns)


def test_exact_match_uses_the_task_normalisation():
    answers = ["cat", "The Cat.", "dog"]
    got = call({"kind": "exact_match"}, ["a cat", "cat", "I think it is a dog"], answer=answers)
    assert got == [float(normalize_answer(p) == normalize_answer(a))
                   for p, a in zip(["a cat", "cat", "I think it is a dog"], answers, strict=True)]
    assert got == [1.0, 1.0, 0.0]


def test_regex_format_and_length():
    assert call({"kind": "regex", "pattern": r"\bcat\b"}, ["my cat", "cats", "cat"]) == [1.0, 0.0, 1.0]
    assert call({"kind": "format", "pattern": r"[a-z]+"}, [" cat ", "a cat", "Cat"]) == [1.0, 0.0, 0.0]
    assert call({"kind": "length", "max_words": 2}, ["cat", "a b c d", "one two"]) == [0.0, -2.0, 0.0]


def test_rewards_carry_their_name_and_weight():
    funcs, weights = build_rewards(GRPOConfig(rewards=[{"kind": "exact_match"}, {"kind": "length", "max_words": 3,
                                                                               "weight": 0.5}]))
    assert [f.__name__ for f in funcs] == ["exact_match", "length"] and weights == [1.0, 0.5]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "userrewards.py").write_text(
        "SEEN = {}\n"
        "def echo(prompts, completions, answers, **columns):\n"
        "    SEEN.update(prompts=prompts, completions=completions, answers=answers, columns=columns)\n"
        "    return [float(len(c)) for c in completions]\n"
        "def boom(prompts, completions, answers, **columns):\n"
        "    raise KeyError('score')\n"
        "def nan(prompts, completions, answers, **columns):\n"
        "    return [0.0, float('nan'), 1.0]\n"
        "def short(prompts, completions, answers, **columns):\n"
        "    return [1.0]\n"
        "def text(prompts, completions, answers, **columns):\n"
        "    return 'good'\n")
    import importlib
    import sys

    sys.modules.pop("userrewards", None)
    return importlib.import_module("userrewards")


def test_user_function_gets_the_documented_arguments(user_module):
    got = call({"kind": "python", "function": "userrewards:echo"}, ["ab", "abc", "a"], answer=["x", "y", None],
               style=["p", "q", "r"])
    assert got == [2.0, 3.0, 1.0]
    seen = user_module.SEEN
    assert seen["completions"] == ["ab", "abc", "a"] and seen["answers"] == ["x", "y", None]
    assert seen["prompts"] == PROMPTS and seen["columns"] == {"style": ["p", "q", "r"]}  # trl's own kwargs held back


@pytest.mark.parametrize("name, words", [
    ("boom", "reward function userrewards.boom raised KeyError: 'score'"),
    ("nan", "reward function userrewards.nan returned nan for completion 1 of the batch"),
    ("short", "reward function userrewards.short returned 1 values for 3 completions"),
    ("text", "reward function userrewards.text returned a str for 3 completions"),
])
def test_user_function_failures_name_the_function_and_the_sample(user_module, name, words):
    with pytest.raises(FinetuneError) as e:
        call({"kind": "python", "function": f"userrewards:{name}"}, ["ab", "abc", "a"], answer=["x", "y", "z"])
    assert words in str(e.value)
    assert "What pet does Ann have?" in str(e.value)  # the sample


def test_exact_match_without_answers_is_refused_before_training():
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": PROMPTS[0], "answer": "cat"}, {"prompt": PROMPTS[0], "answer": None}])
    with pytest.raises(FinetuneError, match=r"1 of 2 prompts have none \(rows 1 after shuffling\)"):
        check_reward_data(GRPOConfig(rewards=[{"kind": "exact_match"}]), rows, "data.train")
    check_reward_data(GRPOConfig(rewards=[{"kind": "length", "max_words": 1}]), rows, "data.train")
