"""Row formats: detect them, apply the recipe's column mapping, and normalise every row to one of two shapes.

SFT rows become `{"messages": [...]}` (alpaca, messages, sharegpt, prompt/completion) or `{"text": ...}` (plain text).
Preference rows become trl's conversational preference shape `{"prompt": [...], "chosen": [...], "rejected": [...]}`.
Problems are collected over the whole source and reported at once, with counts, row locations and a fix.
"""

from __future__ import annotations

from typing import Any

from finetune.data.messages import Problem, check_tool_results, normalise_message, normalise_tools
from finetune.data.readers import Table
from finetune.errors import FinetuneError

# format -> (required fields, optional fields)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("chosen", "rejected"), ("prompt", "system", "conversations", "messages")),
    "unpaired": (("prompt", "completion", "label"), ("system",)),  # KTO: one answer, desirable or not
    "messages": (("messages",), ("system", "tools")),
    "sharegpt": (("conversations",), ("system", "tools")),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
    "prompts": (("prompt",), ("answer", "system")),  # GRPO: prompts (the policy writes the answers); last: catch-all
}
ALL_FIELDS = sorted({f for req, opt in FIELDS.values() for f in (*req, *opt)})
MAX_SHOWN = 5


def detect(columns: set[str]) -> str | None:
    """The first format whose required fields are all among `columns` (preference first: it is the most specific)."""
    return next((name for name, (req, _) in FIELDS.items() if set(req) <= columns), None)


def describe(fmt: str) -> str:
    req, opt = FIELDS[fmt]
    return f"{fmt} rows have {', '.join(req)}" + (f" (optional: {', '.join(opt)})" if opt else "")


class Problems:
    """Row problems grouped by what is wrong; `raise_if_any` reports them all at once."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.by_kind: dict[str, list[tuple[int, str]]] = {}

    def add(self, kind: str, index: int) -> None:
        """Count row `index` under `kind`; a `messages.Problem` also shows its detail beside the row's line."""
        self.by_kind.setdefault(str(kind), []).append((index, getattr(kind, "detail", "")))

    def raise_if_any(self, header: str = "") -> None:
        if not self.by_kind:
            return
        t = self.table
        lines = [f"{t.key} '{t.path}': {header}" if header else f"{t.key} '{t.path}':"]
        for kind, rows in self.by_kind.items():
            shown = "; ".join(t.where(i, short=True) + (f": {d}" if d else "") for i, d in rows[:MAX_SHOWN])
            shown += "; ..." if len(rows) > MAX_SHOWN else ""
            lines.append(f"  {len(rows)} row{'s' if len(rows) > 1 else ''}: {kind} ({shown})")
        raise FinetuneError("\n".join(lines))


def apply_columns(table: Table, columns: dict[str, str]) -> None:
    """Rename the user's columns to the format's field names, in place (`columns` maps field -> user column)."""
    unknown = sorted(set(columns) - set(ALL_FIELDS))
    if unknown:
        raise FinetuneError(f"{table.key}.columns: unknown field name(s) {', '.join(unknown)}; the mapping goes from "
                            f"a format field ({', '.join(ALL_FIELDS)}) to your column name")
    if not columns:
        return
    for row in table.rows:
        for field, column in columns.items():
            if column in row:
                row[field] = row.pop(column)


def resolve_format(table: Table, fmt: str) -> tuple[str, str | None]:
    """(format, notice): the recipe's format, or the one detected from the first row's columns."""
    if fmt != "auto":
        return fmt, None
    columns = set(table.rows[0])
    found = detect(columns)
    if found is None:
        raise FinetuneError(
            f"{table.key} '{table.path}': cannot tell the format from the columns {', '.join(sorted(columns))} "
            f"({table.where(0)}). Known formats: " + "; ".join(describe(f) for f in FIELDS)
            + f". Set {table.key}.format and map your column names with {table.key}.columns, "
            "e.g. {instruction: question, output: answer}."
        )
    return found, f"{table.key} '{table.path}': detected format '{found}' (columns {', '.join(sorted(columns))})"


def to_messages(value: Any, default_role: str) -> list[dict[str, Any]] | str:
    """A list of normalised messages (`messages.normalise_message`) from a message list (role/content or from/value
    items), a single message or a plain string (one message of `default_role`); a problem (a `messages.Problem`
    string) when it is not one of those, or a tool result answers no call."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        return Problem(f"a {type(value).__name__} where a list of messages was expected")
    out = []
    for k, item in enumerate(items):
        message = normalise_message(item, default_role, f"message {k + 1}")
        if isinstance(message, str):
            return message
        out.append(message)
    return check_tool_results(out) or out


def _with_system(messages: list[dict[str, str]], system: Any) -> list[dict[str, str]]:
    if isinstance(system, str) and system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _missing(row: dict[str, Any], fmt: str) -> list[str]:
    return [f for f in FIELDS[fmt][0] if row.get(f) in (None, "", [])]


def _missing_kind(row: dict[str, Any], fmt: str, missing: list[str]) -> str:
    fits = detect(set(row))
    hint = (f"; these columns fit format '{fits}'" if fits and fits != fmt
            else "; map your column names with `columns: {field: your_column}`")
    return (f"missing {', '.join(repr(m) for m in missing)} ({describe(fmt)}; columns found: "
            f"{', '.join(sorted(row)) or 'none'}{hint})")


def normalize_sft(table: Table, fmt: str) -> list[dict[str, Any]]:
    """Every row of an SFT source as {"messages": [...]} or {"text": str}. Raises FinetuneError listing bad rows."""
    if fmt == "preference":
        raise FinetuneError(f"{table.key} '{table.path}': preference rows (chosen/rejected) belong to a dpo stage; "
                            "an sft stage needs messages, alpaca, sharegpt, prompt_completion or text rows")
    problems = Problems(table)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(table.rows):
        missing = _missing(row, fmt)
        if missing:
            problems.add(_missing_kind(row, fmt, missing), i)
            continue
        if fmt == "text":
            if isinstance(row["text"], str):
                out.append({"text": row["text"]})
            else:
                problems.add("'text' is not a string", i)
            continue
        if fmt == "alpaca":
            user = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
            messages: list[dict[str, str]] | str = [{"role": "user", "content": user},
                                                    {"role": "assistant", "content": str(row["output"])}]
        elif fmt == "prompt_completion":
            prompt, completion = to_messages(row["prompt"], "user"), to_messages(row["completion"], "assistant")
            bad = next((p for p in (prompt, completion) if isinstance(p, str)), None)
            messages = bad if bad is not None else [*prompt, *completion]
        else:
            messages = to_messages(row["messages" if fmt == "messages" else "conversations"], "user")
        if isinstance(messages, str):
            problems.add(messages, i)
            continue
        if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls")
               and not m.get("reasoning_content") for m in messages):
            problems.add("empty assistant turn (nothing to learn but stopping; fix or remove these rows)", i)
            continue
        tools = normalise_tools(row.get("tools"))
        if isinstance(tools, Problem):
            problems.add(tools, i)
            continue
        example: dict[str, Any] = {"messages": _with_system(messages, row.get("system"))}
        if tools:
            example["tools"] = tools
        out.append(example)
    problems.raise_if_any()
    return out


def normalize_preference(table: Table) -> list[dict[str, Any]]:
    """Every row as trl's conversational preference triple. Raises FinetuneError counting and naming bad rows:
    missing chosen/rejected, chosen identical to rejected, unusable messages."""
    problems = Problems(table)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(table.rows):
        missing = _missing(row, "preference")
        if missing:
            problems.add(_missing_kind(row, "preference", missing), i)
            continue
        result = _preference_row(row)
        if isinstance(result, str):
            problems.add(result, i)
        else:
            out.append(result)
    problems.raise_if_any("bad preference rows (a dpo stage needs a prompt, a chosen and a different rejected "
                          "answer in every row)")
    return out


def _preference_row(row: dict[str, Any]) -> dict[str, Any] | str:
    chosen, rejected = to_messages(row["chosen"], "assistant"), to_messages(row["rejected"], "assistant")
    raw_prompt = next((row[k] for k in ("prompt", "conversations", "messages") if row.get(k) not in (None, "")), None)
    if isinstance(chosen, str) or isinstance(rejected, str):
        return chosen if isinstance(chosen, str) else rejected  # type: ignore[return-value]
    if raw_prompt is None:
        # Implicit prompt (e.g. Anthropic HH): chosen and rejected are whole conversations sharing the prompt.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            return "no prompt (no 'prompt' field, and chosen/rejected share no leading messages)"
    else:
        prompt = to_messages(raw_prompt, "user")
        if isinstance(prompt, str):
            return prompt
        for side in (chosen, rejected):  # some datasets repeat the prompt at the start of each answer
            if side[: len(prompt)] == prompt and len(side) > len(prompt):
                del side[: len(prompt)]
    if chosen == rejected:
        return "chosen answer identical to the rejected one"
    if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        return "chosen or rejected answer that does not start with an assistant message"
    if any(not m["content"].strip() for m in chosen + rejected if m["role"] == "assistant"):
        return "empty chosen or rejected answer"
    return {"prompt": _with_system(prompt, row.get("system")), "chosen": chosen, "rejected": rejected}
