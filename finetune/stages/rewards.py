"""Reward functions of a GRPO stage: the built-in ones, a user's `module.path:function`, and the checks around them.

Every reward is one float per completion; a stage's rewards are summed with their weights (trl's `reward_weights`)
and GRPO normalises the sum within each prompt's group of completions.

Built-in kinds (`grpo.rewards[].kind`):

    exact_match  1.0 when the completion equals the row's `answer` after `finetune.eval.tasks.normalize_answer`
                 (lower case, no punctuation or articles), else 0.0
    regex        1.0 when `pattern` is found anywhere in the completion (re.search), else 0.0
    format       1.0 when the whole completion, stripped, matches `pattern` (re.fullmatch), else 0.0
    length       -(words beyond `max_words`): 0.0 for a short enough completion, -1.0 per extra word

A user's reward (`kind: python`, `function: my_rewards:brevity`) is Python code that runs in this process, so it runs
only when asked: the stage's `grpo.allow_reward_code: true` (or `ft train --allow-code`). `ft validate` and `ft data
preview` never import it (`finetune.stages.reward_code`: the module's file is found and its source read for the
function's name). At train time it is imported from the current directory (on `sys.path` for the import only) and
called as

    function(prompts: list[list[dict]], completions: list[str], answers: list[str | None], **columns) -> list[float]

with one entry per completion: `prompts` the conversations (lists of {role, content}), `completions` the sampled
answers as text, `answers` the rows' reference answers, and `columns` the rows' other plain columns, each a list
aligned with `completions`. It must return one finite number per completion (Python or numpy floats and ints; a numpy
array or a list). An exception, a wrong length, a non-number or a NaN stops training at that step with a FinetuneError
naming the function and the sample; an exception's text is redacted (`finetune.run.records.redact_text`) first.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

from finetune.errors import FinetuneError
from finetune.eval.tasks import normalize_answer
from finetune.recipe.schema import GRPOConfig, RewardSpec
from finetune.run.records import redact_text
from finetune.stages.reward_code import code_opt_in_problem, load_function

# trl passes these to every reward function beside the dataset's columns; user functions do not see them
_TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def exact_match(completions: list[str], answers: list[str | None], **_: Any) -> list[float]:
    """1.0 where a completion equals its answer once both are normalised, else 0.0."""
    return [float(normalize_answer(c) == normalize_answer(a or "")) for c, a in zip(completions, answers, strict=True)]


def regex_match(pattern: str) -> Callable[..., list[float]]:
    """A reward: 1.0 where `pattern` occurs in the completion."""
    compiled = re.compile(pattern)
    return lambda completions, **_: [float(compiled.search(c) is not None) for c in completions]


def format_match(pattern: str) -> Callable[..., list[float]]:
    """A reward: 1.0 where the whole stripped completion matches `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)
    return lambda completions, **_: [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(max_words: int) -> Callable[..., list[float]]:
    """A reward: minus the number of words beyond `max_words`."""
    return lambda completions, **_: [-float(max(0, len(c.split()) - max_words)) for c in completions]


def reward_name(spec: RewardSpec) -> str:
    """The name a reward is logged under (`rewards/<name>/mean` in metrics.jsonl)."""
    return spec.function.replace(":", ".") if spec.function else spec.kind


def make_reward(spec: RewardSpec) -> Callable[..., list[float]]:
    """The trl reward function of one recipe entry: checked, named, and called with completions as text."""
    if spec.kind == "exact_match":
        func: Callable[..., Any] = exact_match
    elif spec.kind == "regex":
        func = regex_match(spec.pattern or "")
    elif spec.kind == "format":
        func = format_match(spec.pattern or "")
    elif spec.kind == "length":
        func = length_penalty(spec.max_words or 1)
    else:
        func = load_function(spec.function or "")
    name = reward_name(spec)

    def reward(prompts, completions, **kwargs) -> list[float]:
        texts = [_text(c) for c in completions]
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_KWARGS}
        answers = columns.pop("answer", [None] * len(texts))
        try:
            values = func(prompts=prompts, completions=texts, answers=answers, **columns)
        except Exception as e:  # noqa: BLE001 - the user's code: name it and the sample, whatever it raised
            raise FinetuneError(redact_text(f"reward function {name} raised {type(e).__name__}: {e}\n  on the batch "
                                            f"starting with {_sample(prompts, texts, 0)}")) from e
        return check_values(name, values, prompts, texts)

    reward.__name__ = name  # trl logs each reward under its function's name
    return reward


def check_values(name: str, values: Any, prompts: list, texts: list[str]) -> list[float]:
    """`values` as floats, one per completion; a FinetuneError naming the function and the sample otherwise.

    Python and numpy numbers count (`np.float32(1.0)`), in a list, a tuple or a 1-d array; bools do not."""
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:  # a numpy array (or a torch tensor)
        values = values.tolist()
    if not isinstance(values, list | tuple) or len(values) != len(texts):
        got = f"{len(values)} values" if isinstance(values, list | tuple) else f"a {type(values).__name__}"
        raise FinetuneError(f"reward function {name} returned {got} for {len(texts)} completions; it must return a "
                            f"list with one float per completion (batch starting with {_sample(prompts, texts, 0)})")
    out = []
    for i, v in enumerate(values):
        number = isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy floats and ints are Real; np.bool_ not
        if not number or math.isnan(v) or math.isinf(v):
            kind = "" if number else f" (a {type(v).__name__})"
            raise FinetuneError(f"reward function {name} returned {v!r}{kind} for completion {i} of the batch; rewards "
                                f"must be finite numbers ({_sample(prompts, texts, i)})")
        out.append(float(v))
    return out


def build_rewards(grpo: GRPOConfig) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The stage's reward functions and their weights (user functions are imported here, before the model loads).

    Raises:
        FinetuneError: A python reward without `grpo.allow_reward_code`.
    """
    for j, spec in enumerate(grpo.rewards):
        if (problem := code_opt_in_problem(f"grpo.rewards[{j}].function", spec, grpo.allow_reward_code)) is not None:
            raise FinetuneError(problem)
    return [make_reward(spec) for spec in grpo.rewards], [spec.weight for spec in grpo.rewards]


def check_reward_data(grpo: GRPOConfig, rows: Any, where: str) -> None:
    """Rewards that compare with a reference answer need an `answer` in every row: said before the model loads."""
    if not any(spec.kind == "exact_match" for spec in grpo.rewards):
        return
    answers = rows["answer"] if "answer" in rows.column_names else [None] * len(rows)
    missing = [i for i, a in enumerate(answers) if a in (None, "")]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FinetuneError(f"{where}: the exact_match reward compares with each row's `answer`, and {len(missing)} of "
                            f"{len(answers)} prompts have none (rows {shown} after shuffling); add an `answer` column "
                            "or map yours with `columns: {answer: your_column}`")


def _text(completion: Any) -> str:
    """A completion as text: trl hands conversational completions as [{role: assistant, content}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _sample(prompts: list, texts: list[str], i: int) -> str:
    prompt = prompts[i] if i < len(prompts) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    completion = texts[i] if i < len(texts) else None
    return f"prompt {str(prompt)[:120]!r}, completion {str(completion)[:120]!r}"
