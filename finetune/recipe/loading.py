"""Reading a recipe: YAML with positions, `extends:`, `--set key=value` overrides, and errors a person can act on.

Every problem found is collected and raised once as `RecipeError`, naming the file, the YAML path, the line when
known, and what to do. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import RecipeError
from finetune.recipe.overrides import apply_override, mark_override

__all__ = ["RecipeError", "apply_override", "dump_recipe", "explain", "mark_override", "read", "validate"]

VALIDATING: ContextVar[bool] = ContextVar("VALIDATING", default=False)  # `Recipe.__init__` leaves errors to `validate`


# --------------------------------------------------------------------------------------------------------------
# YAML with line numbers


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse a YAML mapping and remember the line of every key path."""
    if not path.exists():
        raise RecipeError(str(path), [f"recipe file not found: {path} (current directory: {Path.cwd()})"])
    if path.is_dir():
        raise RecipeError(str(path), ["this is a folder; give the path of a .yaml recipe file"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(str(path), [f"YAML syntax error at {where}: {e.problem} {e.context or ''}".strip()]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["the top level of a recipe must be a mapping of sections (model:, lora:, ...)"])
    if _expanded_size(data) > MAX_NODES:
        raise RecipeError(str(path), [
            f"the YAML expands to over {MAX_NODES:,} values through aliases (&anchor / *alias), far more than any "
            "recipe needs; write the values out or use fewer nested aliases"])
    lines: dict[tuple, int] = {}
    seen: set[int] = set()

    def walk(n: yaml.Node, prefix: tuple) -> None:
        if id(n) in seen:  # an aliased node: its lines were recorded where it was defined
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


MAX_NODES = 100_000  # values in a recipe once aliases are expanded; real recipes hold a few hundred


def _expanded_size(data: Any) -> int:
    """How many values `data` holds with every alias expanded, counted once per shared object (linear time) and
    stopping early above MAX_NODES."""
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if id(value) not in sizes:
            sizes[id(value)] = 0  # a self-referencing alias counts once
            children = value.values() if isinstance(value, dict) else value
            total = 1
            for child in children:
                total += size(child)
                if total > MAX_NODES:
                    break
            sizes[id(value)] = total
        return sizes[id(value)]

    return size(data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[tuple, int]]:
    data, lines = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, lines
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path.suffix.lower() not in (".yaml", ".yml"):
        raise RecipeError(str(path), [f"extends: '{parent}' is not a recipe (.yaml or .yml file); it was not read"])
    if parent_path in seen or parent_path == path.resolve():
        raise RecipeError(str(path), [f"extends: '{parent}' leads back to a recipe already being read (a cycle)"])
    if not parent_path.exists():
        raise RecipeError(str(path), [f"extends: '{parent}' not found (looked for {parent_path})"])
    base, _ = _resolve_extends(parent_path, seen + (path.resolve(),))
    return _deep_merge(base, data), lines


# --------------------------------------------------------------------------------------------------------------
# Validation errors a person can act on


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_model(field.annotation)
    return model


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Names users bring from other tools, mapped to ours.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "base_model": "name_or_path",
    "model_name_or_path": "name_or_path",
    "load_in_4bit": "mode",
    "datasets": "train",
    "output_dir": "dir",
}


def _suggest(given: str, known: list[str]) -> list[str]:
    """The closest known key: an alias from other tools, a close spelling, or a key the given one starts with."""
    if ALIASES.get(given) in known:
        return [ALIASES[given]]
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    if close:
        return close
    return [k for k in known if given.startswith(k) or k.startswith(given)][:1]


def explain(root: type[BaseModel], err: dict[str, Any], lines: dict[tuple, Any]) -> str:
    """One line for one pydantic error: the YAML path, its line (or `--set` argument), and what to do (did-you-mean)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic adds union member names ("str", "list[str]") to locations: drop them for a clean path.
    loc = tuple(p for p in loc if isinstance(p, int) or not re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool", p))
    path = _dotted(loc) or "(top level)"
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    at = f" (from {line})" if isinstance(line, str) else (f" (line {line})" if line else "")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        known = list(parent.model_fields) if parent else []
        guess = _suggest(str(loc[-1]), known)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        allowed = f" Allowed keys here: {', '.join(known)}." if known else ""
        return f"{path}{at}: unknown key{hint}{allowed}"
    if kind == "missing":
        return f"{path}{at}: required key is missing"
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        text = msg[len("Value error, ") :]
        # A section's own rule (e.g. a reward's fields) does not know where the section sits: say it, unless the
        # message already starts at the top of its path (cross-field rules name their keys themselves).
        return f"{path}{at}: {text}" if loc and not text.startswith(str(loc[0])) else text
    return f"{path}{at}: {msg}{shown}"


def validate(root: type[BaseModel], data: dict[str, Any], source: str, lines: dict[tuple, int] | None = None):
    """Validate a raw mapping into `root`, turning pydantic's errors into one RecipeError listing all of them."""
    token = VALIDATING.set(True)
    try:
        return root.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            problems.extend(explain(root, err, lines or {}).split("\n"))
        raise RecipeError(source, list(dict.fromkeys(problems))) from None
    finally:
        VALIDATING.reset(token)


def read(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[tuple, int]]:
    """A recipe file as a raw mapping with `extends` resolved and overrides applied, and the line of each key."""
    data, lines = _resolve_extends(Path(path))
    for assignment in overrides or []:
        mark_override(lines, apply_override(data, assignment), assignment)
    return data, lines


def dump_recipe(recipe: Any, clean: Any = None) -> str:
    """The fully resolved recipe as YAML (every default written out), which loads back into the same recipe.

    `clean`, a function of the recipe's JSON-like data, is applied before writing (the run folder's copy passes
    `finetune.run.records.redact`: a secret in a value is not written, and loads back as `<redacted>`)."""
    data = recipe.model_dump(mode="json", exclude={"extends"})
    # A stage's `training` holds overrides: only the keys it sets (None included) are written, or reading the file
    # back would override every shared training key with None.
    for stage, out in zip(recipe.stages, data["stages"], strict=True):
        out["training"] = stage.training.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(clean(data) if clean is not None else data, sort_keys=False)
