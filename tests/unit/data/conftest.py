"""Fixtures of the data tests: a fresh copy of the tests' character-level tokenizer, data-file writers, and an
independent reference for token ids (one id per character; special tokens spelled out)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune.recipe.schema import DataConfig

# tests/tinymodels.py (scripts/tiny_tokenizer.py): ids 0-4 are these special tokens, then chr(32)..chr(126), then "\n"
BASE_SPECIAL = {"<|pad|>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, "<unk>": 4}
TOKEN = re.compile(r"«|»|<\|[a-z_]+\|>|<(?:start|end)_of_turn>|.", re.S)


def char_id(c: str) -> int:
    return 100 if c == "\n" else 5 + ord(c) - 32


@pytest.fixture
def tok(tiny_model):
    """A fresh tokenizer (apply_template changes it in place)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture
def expect(tok) -> Callable[[str], tuple[list[int], list[int]]]:
    """(ids, labels) of a text in which «...» marks the trained part; tokens added by a template (e.g. <|eot_id|>)
    take their id from the tokenizer, every other id comes from the character table above."""

    def parse(marked: str) -> tuple[list[int], list[int]]:
        ids, labels, trained = [], [], False
        for t in TOKEN.findall(marked):
            if t in "«»":
                trained = t == "«"
                continue
            tid = BASE_SPECIAL[t] if t in BASE_SPECIAL else tok.convert_tokens_to_ids(t) if len(t) > 1 else char_id(t)
            ids.append(tid)
            labels.append(tid if trained else -100)
        return ids, labels

    return parse


@pytest.fixture
def write(tmp_path) -> Callable[..., Path]:
    """write(name, rows) -> path of a jsonl file (rows: dicts, or raw strings written as they are)."""

    def _write(name: str, rows: list[Any]) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def cfg() -> Callable[..., DataConfig]:
    """cfg(path or source dict, ..., **keys) -> a data section (no on-disk cache, no shuffle unless asked)."""

    def _cfg(*paths: Path | str | dict, **kw: Any) -> DataConfig:
        sources = [p if isinstance(p, dict) else {"path": str(p)} for p in paths]
        return DataConfig(**{"train": sources, "cache_dir": None, "shuffle": False, **kw})

    return _cfg
