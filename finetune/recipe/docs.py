"""Recipe documentation generated from the schema's own docstrings (one source of truth for CLI help and docs)."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from finetune.recipe.loading import _section_model
from finetune.recipe.schema import Recipe


def _type_name(annotation: typing.Any) -> str:
    """A short readable type: `int`, `str | None`, `'nf4' | 'fp4'`."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(args[0])
    if isinstance(annotation, type) and not args:
        return "None" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "")


def _rows(model: type[BaseModel], prefix: str, seen: dict[type, str]) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_model(field.annotation)
        if sub is None:
            default = "" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((key, _type_name(field.annotation), default, field.description or ""))
            continue
        kind = "list of sections" if _is_list(field.annotation) else "section"
        if sub in seen:  # a section documented already (a stage's own `data`, `eval` sources...)
            rows.append((key, kind, "", f"{field.description or ''} Same keys as `{seen[sub]}`."))
            continue
        seen[sub] = key
        rows.append((key, kind, "", field.description or ""))
        rows.extend(_rows(sub, f"{key}[]." if kind == "list of sections" else f"{key}.", seen))
    return rows


def _is_list(annotation: typing.Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation))


def all_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every recipe key, sections included."""
    return _rows(Recipe, "", {})


def describe(key: str | None = None) -> str:
    """Plain-text documentation of one key or section (all of them when key is None)."""
    rows = all_rows()
    if key:
        norm = key.replace("[]", "")
        rows = [r for r in rows if r[0].replace("[]", "") == norm or r[0].replace("[]", "").startswith(norm + ".")]
        if not rows:
            import difflib

            keys = [r[0].replace("[]", "") for r in all_rows()]
            guess = difflib.get_close_matches(norm, keys, n=3)
            raise KeyError(f"no recipe key '{key}'" + (f"; did you mean {', '.join(guess)}?" if guess else ""))
    out = []
    for k, typ, default, desc in rows:
        if "section" in typ:
            out.append(f"{k}  [{typ}]")
        else:
            out.append(f"{k}  ({typ}" + (f", default {default})" if default else ")"))
        out.extend(f"    {line.strip()}" for line in desc.splitlines() if line.strip())
    return "\n".join(out)


def markdown() -> str:
    """docs/recipe.md: one table row per key."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from the docstrings in `finetune/recipe/schema.py` by `python scripts/gen_recipe_docs.py`;",
        "`ft explain KEY` prints the same text. Do not edit by hand.",
        "",
        "| key | type | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for k, typ, default, desc in all_rows():
        text = " ".join(desc.split()).replace("|", "\\|")
        typ = typ.replace("|", "\\|")
        lines.append(f"| `{k}` | {typ} | {default.replace('|', chr(92) + '|')} | {text} |")
    return "\n".join(lines) + "\n"
