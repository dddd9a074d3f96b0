"""The GPU check's modules (scripts/gpu/), imported as the check imports them: with that folder on sys.path, taken
off again afterwards."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

FOLDER = str(Path(__file__).resolve().parents[1] / "scripts" / "gpu")


@contextlib.contextmanager
def gpu_scripts(*names: str) -> Iterator[tuple]:
    """The named modules of scripts/gpu/, in order."""
    sys.path.insert(0, FOLDER)
    try:
        yield tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(FOLDER)
