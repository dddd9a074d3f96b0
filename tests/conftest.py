"""Shared fixtures: tiny models and data built once per test session (offline, CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "scripts"))  # benchmark and test helpers that live with the scripts using them


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A character-level tokenizer + random 2-layer Llama, saved to a folder."""
    from tinymodels import build_char_model

    return build_char_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory) -> dict[str, Path]:
    """Train and eval chat files of the addition task."""
    from tinymodels import write_addition_data

    d = tmp_path_factory.mktemp("data")
    return {"train": write_addition_data(d / "train.jsonl", 64), "eval": write_addition_data(d / "eval.jsonl", 16, 64)}


@pytest.fixture(scope="session")
def moe(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3-MoE and a tiny Mixtral (scripts/build_fixture_models.py), saved to folders."""
    from build_fixture_models import build

    out = tmp_path_factory.mktemp("moe")
    return {name: build(name, out / name) for name in ("qwen3-moe", "mixtral")}


@pytest.fixture
def in_root(monkeypatch):
    """Run the test from the project root (recipes use paths relative to it)."""
    monkeypatch.chdir(ROOT)
    return ROOT
