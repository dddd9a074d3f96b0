"""GRPO rewards: the built-in kinds score what their docs say, user functions get the documented arguments, and
every failure names the function and the sample."""

from __future__ import annotations

import sys

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


def test_numpy_numbers_are_rewards(user_module, tmp_path):
    """Issue 33 item 14: `np.float32(1.0)` is a finite number; a numpy array is a list of them; np.bool_ is not."""
    (tmp_path / "nprewards.py").write_text(
        "import numpy as np\n"
        "def scalars(prompts, completions, answers, **columns):\n"
        "    return [np.float32(1.0), np.int64(2), np.float64(0.5)]\n"
        "def array(prompts, completions, answers, **columns):\n"
        "    return np.array([1.0, 0.0, 0.25], dtype=np.float32)\n"
        "def flags(prompts, completions, answers, **columns):\n"
        "    return [np.bool_(True)] * 3\n")
    texts = ["ab", "abc", "a"]
    assert call({"kind": "python", "function": "nprewards:scalars"}, texts) == [1.0, 2.0, 0.5]
    assert call({"kind": "python", "function": "nprewards:array"}, texts) == [1.0, 0.0, 0.25]
    with pytest.raises(FinetuneError, match=r"returned .*True.* \(a bool_?\) for completion 0"):
        call({"kind": "python", "function": "nprewards:flags"}, texts)


def test_reward_exception_text_is_redacted(user_module, tmp_path):
    """Issue 33 item 6: an HTTP error quoting a URL with a key reaches neither the message nor summary.json."""
    (tmp_path / "leaky.py").write_text(
        "def score(prompts, completions, answers, **columns):\n"
        "    raise RuntimeError('403 for https://api.example.com/v1?api_key=abcdef1234567890XYZ&q=1 "
        "(token ghp_' + 'A' * 36 + ')')\n")
    with pytest.raises(FinetuneError) as e:
        call({"kind": "python", "function": "leaky:score"}, ["a"])
    text = str(e.value)
    assert "abcdef1234567890XYZ" not in text and "ghp_" not in text
    assert "api_key=<redacted>&q=1" in text and "reward function leaky.score raised RuntimeError" in text


SPY = ("import os\n"
       "open(os.path.join(os.path.dirname(__file__), 'RAN'), 'w').write(os.environ.get('HF_TOKEN', 'none'))\n"
       "def score(prompts, completions, answers, **columns):\n"
       "    return [1.0] * len(completions)\n")


def test_checking_a_reward_never_imports_it(tmp_path, monkeypatch):
    """Issue 33 item 5: the `module:function` spec is checked from the file's source; nothing of it runs."""
    from finetune.stages.reward_code import check_function

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spyreward.py").write_text(SPY)
    (tmp_path / "spypkg").mkdir()
    (tmp_path / "spypkg" / "__init__.py").write_text(SPY)
    (tmp_path / "spypkg" / "inner.py").write_text("from math import sqrt as root\nscore = None\n")
    path_before = list(sys.path)
    assert check_function("spyreward:score") == tmp_path / "spyreward.py"
    assert check_function("spypkg.inner:root") == tmp_path / "spypkg" / "inner.py"  # the package's __init__ not run
    with pytest.raises(FinetuneError, match=r"spyreward\.py defines no function 'scor' at its top level"):
        check_function("spyreward:scor")
    with pytest.raises(FinetuneError, match="no module 'nosuchreward'"):
        check_function("nosuchreward:score")
    (tmp_path / "broken.py").write_text("def score(:\n")
    with pytest.raises(FinetuneError, match=r"broken\.py cannot be read as Python"):
        check_function("broken:score")
    assert not (tmp_path / "RAN").exists() and "spyreward" not in sys.modules and "spypkg" not in sys.modules
    assert sys.path == path_before


def test_user_code_runs_only_with_the_opt_in_and_leaves_sys_path_alone(tmp_path, monkeypatch):
    """Issue 33 item 5: build_rewards refuses a python reward without grpo.allow_reward_code; with it, the module is
    imported from the current directory, which is off sys.path again afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "spyreward2", raising=False)
    (tmp_path / "spyreward2.py").write_text(SPY)
    spec = [{"kind": "python", "function": "spyreward2:score"}]
    with pytest.raises(FinetuneError, match=r"grpo.rewards\[0\].function: 'spyreward2:score' is Python code .* "
                                            r"grpo.allow_reward_code: true .*--allow-code"):
        build_rewards(GRPOConfig(rewards=spec))
    assert not (tmp_path / "RAN").exists()
    path_before = list(sys.path)
    funcs, _ = build_rewards(GRPOConfig(rewards=spec, allow_reward_code=True))
    assert (tmp_path / "RAN").exists() and funcs[0].__name__ == "spyreward2.score"
    assert sys.path == path_before and str(tmp_path) not in sys.path


def test_validate_and_preview_run_no_reward_code_and_train_needs_the_opt_in(tmp_path, monkeypatch, tiny_model):
    """Issue 33 item 5, through the CLI: `ft validate` and `ft data preview` leave the module unimported (its file
    would write HF_TOKEN out) and sys.path as it was; validate and train refuse it until opted in."""
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    (tmp_path / "spyreward3.py").write_text(SPY)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: [{{path: prompts.jsonl}}]}}\n"
                      "output: {dir: runs}\nstages:\n  - name: rl\n    kind: grpo\n    grpo:\n      reference: base\n"
                      "      rewards: [{kind: python, function: 'spyreward3:score'}]\n")
    path_before = list(sys.path)
    runner = CliRunner()
    refused = runner.invoke(app, ["validate", str(recipe)])
    assert refused.exit_code == 2
    assert "stages[0].grpo.rewards[0].function: 'spyreward3:score' is Python code" in refused.output
    assert "grpo.allow_reward_code: true" in refused.output and "--allow-code" in refused.output
    assert runner.invoke(app, ["validate", str(recipe), "--allow-code"]).exit_code == 0
    assert runner.invoke(app, ["validate", str(recipe), "--set", "stages.0.grpo.allow_reward_code=true"]
                         ).exit_code == 0
    preview = runner.invoke(app, ["data", "preview", str(recipe), "-n", "1"])
    assert preview.exit_code == 0, preview.output
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 2  # refused before anything loads
    assert not (tmp_path / "RAN").exists() and "spyreward3" not in sys.modules and sys.path == path_before
    assert not (tmp_path / "runs").exists()
