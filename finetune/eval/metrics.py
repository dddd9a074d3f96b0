"""Task metrics of text answers, without a model: each takes predictions (and references) and returns a rate.

`exact_match` and `contains_answer` compare after `finetune.eval.tasks.normalize_answer` (SQuAD style); `token_f1`
is SQuAD's F1 over the normalised words; `regex` searches a pattern in the raw prediction; `choice_accuracy` takes
the model's scores of each choice and the index of the right one. `check_task_rows` refuses a task file that cannot
be scored (rows without answers, a metric it lacks data for) before any model loads.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.eval.tasks import CONCISE_MAX_WORDS, exact_match, normalize_answer

GENERATED = ("exact_match", "contains_answer", "token_f1", "regex", "concise_rate")  # scored on greedy answers
SCORED = ("choice_accuracy",)  # scored on the model's log-likelihood of each choice
KNOWN = GENERATED + SCORED


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _pairs(predictions: list[str], references: list[Any]) -> list[tuple[str, Any]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return list(zip(predictions, references, strict=True))


def contains_answer(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions that contain their normalised answer as whole words."""
    return _mean([f" {normalize_answer(a)} " in f" {normalize_answer(p)} " for p, a in _pairs(predictions, answers)])


def concise_rate(predictions: list[str]) -> float:
    """Share of non-empty predictions of at most `CONCISE_MAX_WORDS` normalised words."""
    return _mean([0 < len(normalize_answer(p).split()) <= CONCISE_MAX_WORDS for p in predictions])


def token_f1(predictions: list[str], answers: list[str]) -> float:
    """Mean F1 over normalised words (SQuAD): 2PR / (P + R) of the multiset overlap of prediction and answer.

    Two empty texts score 1, one empty text 0.
    """
    scores = []
    for p, a in _pairs(predictions, answers):
        pw, aw = normalize_answer(p).split(), normalize_answer(a).split()
        if not pw or not aw:
            scores.append(float(pw == aw))
            continue
        same = sum((Counter(pw) & Counter(aw)).values())
        if same == 0:
            scores.append(0.0)
            continue
        precision, recall = same / len(pw), same / len(aw)
        scores.append(2 * precision * recall / (precision + recall))
    return _mean(scores)


def row_pattern(row: dict[str, Any], default: str | None) -> str:
    """The regular expression of a row: its own `pattern`, else the file's with `{answer}` filled in (escaped)."""
    if row.get("pattern"):
        return str(row["pattern"])
    if default is None:
        raise ValueError("no pattern")
    return default.replace("{answer}", re.escape(str(row.get("answer", ""))))


def regex_match(predictions: list[str], patterns: list[str]) -> float:
    """Share of predictions in which their pattern is found (`re.search`, case-insensitive)."""
    return _mean([re.search(pat, p, re.IGNORECASE) is not None for p, pat in _pairs(predictions, patterns)])


def choice_accuracy(scores: list[list[float]], gold: list[int]) -> float:
    """Share of rows whose highest-scored choice is the right one (the first of equal scores wins)."""
    return _mean([max(range(len(s)), key=s.__getitem__) == g for s, g in _pairs(scores, gold)])  # type: ignore[arg-type]


def gold_index(row: dict[str, Any]) -> int:
    """Index of the right choice: `answer` as an index or as the text of one of `choices`."""
    answer, choices = row["answer"], row["choices"]
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if str(answer) in [str(c) for c in choices]:
        return [str(c) for c in choices].index(str(answer))
    raise ValueError(f"answer {answer!r} is not one of its choices")


def score_generated(metrics: list[str], predictions: list[str], rows: list[dict[str, Any]],
                    pattern: str | None = None) -> dict[str, float]:
    """The generated-answer metrics asked for, on predictions of `rows` (in order)."""
    answers = [str(r["answer"]) for r in rows]
    out: dict[str, float] = {}
    for name in metrics:
        if name == "exact_match":
            out[name] = exact_match(predictions, answers)
        elif name == "contains_answer":
            out[name] = contains_answer(predictions, answers)
        elif name == "token_f1":
            out[name] = token_f1(predictions, answers)
        elif name == "regex":
            out[name] = regex_match(predictions, [row_pattern(r, pattern) for r in rows])
        elif name == "concise_rate":
            out[name] = concise_rate(predictions)
    return out


def _asking_problem(row: Any) -> str | None:
    """What keeps a (normalised, `finetune.eval.taskrows`) row from being asked, or None."""
    if not isinstance(row, dict):
        return "not a JSON object (a task row is {\"prompt\": ..., \"answer\": ...})"
    asked = row["prompt"] if "prompt" in row else row.get("messages")  # as `tasks._prompt_of` reads it
    if asked in (None, "", []):
        return "no `messages` or `prompt` to answer"
    if not isinstance(asked, list):
        return "a `prompt` or `messages` that is neither text nor a list of {role, content} messages"
    if any(not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
           for m in asked):
        return "messages that are not {role, content} objects with text content"
    if "prompt" not in row and asked[-1]["role"] == "assistant":
        asked = asked[:-1]  # the answer, when the row has none of its own
    if not any(m["role"] == "user" for m in asked):
        return "no user turn to answer (the messages hold only assistant or system turns)"
    return None


def check_task_rows(path: str | Path, rows: list[dict[str, Any]], metrics: list[str],
                    pattern: str | None = None) -> None:
    """Refuse a task file that cannot be scored with `metrics`, naming the file, the rows and the fix.

    Raises:
        FinetuneError: Unknown metric, no rows, rows without a prompt or an answer, `choice_accuracy` rows without
            `choices` (or an answer outside them), `regex` without a pattern, or a pattern that does not compile.
    """
    unknown = [m for m in metrics if m not in KNOWN]
    if unknown:
        raise FinetuneError(f"{path}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    if not rows:
        raise FinetuneError(f"{path}: no rows; a task file needs one JSON object per line")
    problems: dict[str, list[int]] = {}
    for i, row in enumerate(rows, 1):
        found = []
        if (asking := _asking_problem(row)) is not None:
            found.append(asking)
        elif row.get("answer") in (None, ""):
            found.append("no `answer`")
        elif isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
            found.append("an `answer` that is not text or a number (a dict or list cannot be compared with the "
                         "generated text; give the answer as a string)")
        elif "choice_accuracy" in metrics:
            if not isinstance(row.get("choices"), list) or len(row["choices"]) < 2:
                found.append("no `choices` list (choice_accuracy needs two or more)")
            else:
                try:
                    gold_index(row)
                except ValueError as e:
                    found.append(str(e))
        if isinstance(row, dict) and "regex" in metrics and not found:
            try:
                re.compile(row_pattern(row, pattern))
            except ValueError:
                found.append("no `pattern` (and no eval.tasks[].pattern)")
            except re.error as e:
                found.append(f"a pattern that does not compile ({e})")
        for problem in found:
            problems.setdefault(problem, []).append(i)
    if problems:
        lines = [f"  {problem}: row(s) {', '.join(map(str, lines[:5]))}{' ...' if len(lines) > 5 else ''} "
                 f"({len(lines)} of {len(rows)})" for problem, lines in problems.items()]
        raise FinetuneError(f"{path}: rows that cannot be scored for {', '.join(metrics)}:\n" + "\n".join(lines)
                            + "\nFix the rows or choose other metrics for this file (eval.tasks[].metrics).")
