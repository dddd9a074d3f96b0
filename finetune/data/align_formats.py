"""Rows for the alignment stages beyond DPO: unpaired answers for KTO, prompts (with answers) for GRPO.

KTO rows become trl's conversational unpaired shape `{"prompt": [...], "completion": [...], "label": bool}`; a
preference source is split, each pair giving a desirable (chosen) and an undesirable (rejected) row. GRPO rows become
`{"prompt": [...], "answer": str | None, ...}`: the conversation the policy answers, the reference answer that
answer-checking rewards compare with, and the row's other plain columns, which trl hands to reward functions.
"""

from __future__ import annotations

from typing import Any

from finetune.data.formats import Problems, _missing, _missing_kind, _preference_row, _with_system, to_messages
from finetune.data.readers import Table
from finetune.errors import FinetuneError

UNPAIRED_FORMATS = ("unpaired", "preference")
PROMPT_FORMATS = ("prompts", "messages", "prompt_completion", "sharegpt")
_LABELS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def label_of(value: Any) -> bool | None:
    """A KTO label as a bool (true/false, 1/0, yes/no), None when it is none of these."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _LABELS.get(value.strip().lower()) if isinstance(value, str) else None


def normalize_unpaired(table: Table, fmt: str) -> tuple[list[dict[str, Any]], str | None]:
    """Every row of a KTO source as {prompt, completion, label}, and a notice when pairs were split.

    Raises:
        FinetuneError: Rows without a usable prompt, completion or label (counted, located, with the fix).
    """
    if fmt not in UNPAIRED_FORMATS:
        raise FinetuneError(f"{table.key} '{table.path}': a kto stage needs unpaired rows (prompt, completion, label "
                            f"true/false) or preference pairs to split; this source is '{fmt}'")
    problems = Problems(table)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(table.rows):
        missing = _missing(row, fmt)
        if fmt == "unpaired" and missing == ["label"] or (fmt == "unpaired" and row.get("label") == ""):
            problems.add("no 'label' (kto needs label: true for a desirable answer, false for an undesirable one; "
                         "map another column with `columns: {label: your_column}`)", i)
            continue
        if missing:
            problems.add(_missing_kind(row, fmt, missing), i)
            continue
        if fmt == "preference":
            pair = _preference_row(row)
            if isinstance(pair, str):
                problems.add(pair, i)
                continue
            out += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
            continue
        label = label_of(row["label"])
        prompt, completion = to_messages(row["prompt"], "user"), to_messages(row["completion"], "assistant")
        if label is None:
            problems.add(f"'label' is {row['label']!r}, not true/false", i)
        elif isinstance(prompt, str) or isinstance(completion, str):
            problems.add(prompt if isinstance(prompt, str) else completion, i)  # type: ignore[arg-type]
        elif not completion or completion[0]["role"] != "assistant" or not completion[0]["content"].strip():
            problems.add("completion that is not a non-empty assistant answer", i)
        else:
            out.append({"prompt": _with_system(prompt, row.get("system")), "completion": completion, "label": label})
    problems.raise_if_any("bad kto rows")
    notice = None
    if fmt == "preference":
        notice = (f"{table.key} '{table.path}': preference pairs split for kto: {len(out) // 2} chosen answers as "
                  f"desirable, {len(out) // 2} rejected answers as undesirable")
    return out, notice


def normalize_prompts(table: Table, fmt: str) -> list[dict[str, Any]]:
    """Every row of a GRPO source as {prompt, answer, other plain columns}.

    `messages`, `sharegpt` and `prompt_completion` rows lose their final assistant turn (the policy writes it); a
    row's `answer` is kept for the rewards that check one (None when the row has none).

    Raises:
        FinetuneError: Rows without a prompt, or whose prompt does not end with a user turn.
    """
    if fmt not in PROMPT_FORMATS:
        raise FinetuneError(f"{table.key} '{table.path}': a grpo stage needs prompts (a `prompt` column, or messages "
                            f"whose final assistant turn is dropped); this source is '{fmt}'")
    field = {"prompts": "prompt", "messages": "messages", "sharegpt": "conversations",
             "prompt_completion": "prompt"}[fmt]
    problems = Problems(table)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(table.rows):
        if row.get(field) in (None, "", []):
            problems.add(f"no '{field}' column (a grpo stage needs the prompt the policy answers; map yours with "
                         f"`columns: {{{field}: your_column}}`)", i)
            continue
        prompt = to_messages(row[field], "user")
        if isinstance(prompt, str):
            problems.add(prompt, i)
            continue
        if prompt[-1]["role"] == "assistant" and fmt != "prompts":
            prompt = prompt[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            problems.add("a prompt that does not end with a user turn", i)
            continue
        extra = {k: v for k, v in row.items() if k not in (field, "completion", "system", "answer")
                 and isinstance(v, str | int | float | bool)}
        answer = row.get("answer")
        out.append({**extra, "prompt": _with_system(prompt, row.get("system")),
                    "answer": None if answer is None else str(answer)})
    problems.raise_if_any("bad grpo prompt rows")
    return out
