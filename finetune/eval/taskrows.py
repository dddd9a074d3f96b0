"""Task files (`data.task_eval`, `eval.tasks`): read as UTF-8 JSON Lines and brought to one row shape before any
model loads.

A row asks with `prompt` (a string, or a list of `{role, content}` messages) or with `messages`; a `messages` row
without `answer` takes its last assistant message as the answer (and asks with the turns before it). A string
prompt becomes one user message. Rows that still cannot be asked or answered (an int prompt, a dict answer, no user
turn) are refused by `finetune.eval.metrics.check_task_rows`, naming the file, the rows and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError


def read_text(path: str, key: str) -> str:
    """The text of a UTF-8 file; a missing file or bytes that are not UTF-8 raise a FinetuneError naming `key`, the
    file and the line."""
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"{key}: {path} does not exist (paths are relative to the current directory)")
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FinetuneError(f"{key}: {path} line {line} is not UTF-8 text (byte {e.start}); save the file as "
                            "UTF-8") from None


def read_jsonl(path: str, key: str) -> list[Any]:
    """The rows of a JSON Lines file; a missing file, bytes that are not UTF-8 or a line that is not JSON raise a
    FinetuneError naming `key`, the file and the line."""
    from finetune.data.readers import json_lines

    return json_lines(read_text(path, key), path, key)[0]


def read_general_text(path: str, limit: int | None) -> list[str]:
    """Documents of a general-text file: `.txt` one per line, `.jsonl` rows with `text`."""
    if path.endswith(".jsonl"):
        rows = read_jsonl(path, "eval.general_text")
        bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or not isinstance(r.get("text"), str)]
        if bad:
            raise FinetuneError(f"eval.general_text: {path} rows {bad[:5]} have no `text` string")
        docs = [r["text"] for r in rows]
    else:
        text = read_text(path, "eval.general_text")
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise FinetuneError(f"eval.general_text: {path} holds no text")
    return docs[:limit]


def normalize_task_row(row: Any) -> Any:
    """The row in the shape the metrics read: a string `prompt` as one user message, and a `messages` row without
    `answer` answered by its last assistant message. Anything else is returned as it is (checked later)."""
    if not isinstance(row, dict):
        return row
    out = dict(row)
    if isinstance(out.get("prompt"), str) and out["prompt"].strip():
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
    messages = out.get("messages")
    if out.get("answer") in (None, "") and "prompt" not in out and isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            out["answer"] = last["content"]
    return out


def load_task_file(path: str, key: str, metrics: list[str] | None, pattern: str | None = None,
                   max_rows: int | None = None) -> list[dict[str, Any]]:
    """The first `max_rows` rows of a task file (None: all), normalised and checked for `metrics` (None: not
    checked, for readers that take what they can use, such as an export's verification).

    Raises:
        FinetuneError: The file cannot be read, or rows cannot be scored (see `check_task_rows`).
    """
    from finetune.eval.metrics import check_task_rows

    rows = [normalize_task_row(r) for r in read_jsonl(path, key)][:max_rows]
    if metrics is not None:
        check_task_rows(path, rows, metrics, pattern)
    return rows


def task_file_problems(path: str, key: str) -> list[str]:
    """What keeps `data.task_eval` from being the stage's held-out measure (`ft validate`, before any model loads)."""
    if not Path(path).exists():
        return [f"{key}: '{path}' does not exist"]
    try:
        load_task_file(path, key, ["exact_match"])
    except FinetuneError as e:
        return [str(e) if str(e).startswith(key) else f"{key}: {e}"]
    return []


def eval_section_problems(recipe: Any) -> list[str]:
    """The `eval` section's task files and general text read and checked as `ft eval` and the end of a stage read
    them (`ft validate` and `ft train`, before any model loads); files that do not exist are named too."""
    cfg, problems = recipe.eval, []
    for i, task in enumerate(cfg.tasks):
        key = f"eval.tasks[{i}]"
        try:
            if not Path(task.path).exists():
                raise FinetuneError(f"{key}.path: '{task.path}' does not exist")
            load_task_file(task.path, key, list(task.metrics), task.pattern)
        except FinetuneError as e:
            problems.append(str(e) if str(e).startswith(key) else f"{key}: {e}")
    if cfg.general_text:
        try:
            read_general_text(cfg.general_text, None)
        except FinetuneError as e:
            problems.append(str(e))
    return problems
