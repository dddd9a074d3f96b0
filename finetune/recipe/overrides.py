"""`--set KEY=VALUE` overrides of a raw recipe mapping: key paths (`data.train[0].path`, `data.train.0.path`,
`stages.dpo.dpo.beta`), YAML values, and errors that point at the `--set` argument. Nothing here imports torch."""

from __future__ import annotations

import re
from typing import Any

import yaml

from finetune.errors import RecipeError


def override_path(key: str) -> list[str]:
    """The parts of an override key: `data.train[0].path` and `data.train.0.path` both give data, train, 0, path."""
    parts: list[str] = []
    for piece in key.strip().split("."):
        match = re.fullmatch(r"([^\[\]]*)((?:\[[^\[\]]*\])*)", piece)
        if match is None:
            raise RecipeError("--set", [f"'{key}': cannot read '{piece}'; write list items as train[0] or train.0"])
        name, brackets = match.groups()
        parts += [name] if name else []
        parts += re.findall(r"\[([^\[\]]*)\]", brackets)
    if not parts or any(not p.strip() for p in parts):
        raise RecipeError("--set", [f"'{key}' has an empty key part (example: --set data.train[0].path=my.jsonl)"])
    return [p.strip() for p in parts]


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str | int, ...]:
    """Apply one `a.b.c=value` override in place and return the key path it set.

    The value is parsed as YAML (`1e-4`, `true`, `[q_proj, v_proj]`). A list item is addressed by index, in either
    notation (`data.train[0].path=x`, `data.train.0.path=x`) or, for stages, by name (`stages.dpo.dpo.beta=0.2`).

    Raises:
        RecipeError: Not KEY=VALUE, an empty key, a value that is not valid YAML, or a list index out of range.
    """
    if "=" not in assignment:
        raise RecipeError("--set", [f"'{assignment}' is not KEY=VALUE (example: --set training.learning_rate=1e-4)"])
    key, raw = assignment.split("=", 1)
    parts = override_path(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError("--set", [f"{assignment}: the value is not valid YAML ({problem}); quote it, e.g. "
                                    f"--set '{key}=\"{raw}\"'"]) from None
    node: Any = data
    path: list[str | int] = []
    for n, part in enumerate(parts):
        step: str | int = part
        if isinstance(node, list):
            if part == str(len(node)):  # one past the end: a new item (`data.train[0].path=x` with no train list)
                node.append({})
            step = _list_index(node, part, key)
        elif not isinstance(node, dict):
            raise RecipeError("--set", [f"{assignment}: '{_dotted(tuple(path))}' is a value, not a section"])
        elif n < len(parts) - 1 and not isinstance(node.get(part), (dict, list)):
            node[part] = [] if re.fullmatch(r"\d+", parts[n + 1]) else {}
        path.append(step)
        if n == len(parts) - 1:
            node[step] = value
        else:
            node = node[step]
    return tuple(path)


def _list_index(items: list[Any], part: str, key: str) -> int:
    if re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if -len(items) <= idx < len(items):
            return idx
        raise RecipeError("--set", [f"{key}: index {idx} is out of range (the list has {len(items)} items)"])
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    names = [it.get("name") for it in items if isinstance(it, dict)]
    raise RecipeError("--set", [f"{key}: no list item named '{part}' (have: {names})"])


def mark_override(lines: dict[tuple, Any], path: tuple, assignment: str) -> None:
    """Make errors at or under an overridden key point at the `--set` argument instead of a line of the file."""
    for known in [k for k in lines if k[: len(path)] == path]:
        del lines[known]
    lines[path] = f"--set {assignment}"


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
