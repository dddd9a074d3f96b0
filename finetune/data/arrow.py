"""Sources as Arrow datasets, memory-mapped from the `datasets` cache instead of read into Python lists.

JSON Lines and parquet files load with the `datasets` builders of those names (one Arrow file per data file, so a
row's file and line can be named later), `save_to_disk` folders with `load_from_disk` and Hub ids with
`load_dataset`. JSON array files and CSV keep the list reader (a JSON array is parsed whole anyway; CSV values stay
strings). A file the Arrow builders cannot read (malformed, or columns whose types differ between rows) returns
None, and the caller falls back to the list reader, which names the bad line or reads the mixed rows as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.readers import SUFFIXES, _load_hub, _load_saved, data_files, is_saved_dataset
from finetune.errors import FinetuneError
from finetune.recipe.schema import DatasetSource

_BUILDERS = {"jsonl": "json", "parquet": "parquet"}


@dataclass
class ArrowSource:
    """One source as a `datasets.Dataset` and, for naming rows, the files it came from."""

    key: str
    path: str
    dataset: Any  # datasets.Dataset, memory-mapped
    files: list[tuple[str, int, str]] = field(default_factory=list)  # (file, rows, jsonl|parquet|row)

    def origins(self, rows: list[int]) -> list[tuple[str, str]]:
        """(file, "line 3" / "row 3") of each row (JSON Lines counted as their reader counts: blank lines skipped;
        each file read once, lazily: only when an error names rows)."""
        starts, k = [], 0
        for _, n, _ in self.files:
            starts.append(k)
            k += n
        out: list[tuple[str, str] | None] = [None] * len(rows)
        for f, (file, n, kind) in enumerate(self.files):
            mine = {i - starts[f]: j for j, i in enumerate(rows) if starts[f] <= i < starts[f] + n}
            if not mine:
                continue
            lines = _lines_of(Path(file), set(mine)) if kind == "jsonl" else {}
            for local, j in mine.items():
                out[j] = (file, f"line {lines[local]}" if local in lines else f"row {local + 1}")
        return [o or (self.path, f"row {i + 1}") for o, i in zip(out, rows, strict=True)]


def _lines_of(file: Path, wanted: set[int]) -> dict[int, int]:
    """{index: line number} of the wanted non-blank lines of a file."""
    out, k = {}, -1
    with file.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                k += 1
                if k in wanted:
                    out[k] = n
                    if len(out) == len(wanted):
                        break
    return out


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_arrow(src: DatasetSource, key: str, cache_dir: str | None) -> ArrowSource | None:
    """The source as a memory-mapped Arrow dataset, or None when a file needs the list reader (see module docs).

    Raises:
        FinetuneError: A missing path, a bad save_to_disk folder or a Hub dataset that cannot be loaded.
    """
    from datasets import concatenate_datasets, load_dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    path = Path(src.path)
    if is_saved_dataset(path):
        ds = _load_saved(path, src, key)
        return ArrowSource(key, src.path, ds, [(src.path, len(ds), "row")])
    if not path.exists():
        ds = _load_hub(src, key)
        return ArrowSource(key, src.path, ds, [(src.path, len(ds), "row")])
    files = data_files(path, key)
    if any(SUFFIXES[f.suffix.lower()] not in _BUILDERS for f in files):
        return None
    parts, where = [], []
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        for file in files:
            kind = SUFFIXES[file.suffix.lower()]
            try:
                ds = load_dataset(_BUILDERS[kind], data_files=str(file), split="train", cache_dir=cache_dir)
            except Exception:  # malformed, or types that differ between rows: the list reader says which
                return None
            parts.append(ds)
            where.append((str(file), len(ds), kind))
    finally:
        if not quiet:
            enable_progress_bars()
    if not parts or sum(len(p) for p in parts) == 0:
        raise FinetuneError(f"{key}: '{src.path}' holds no rows")
    try:
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except Exception:  # files of one folder with different columns
        return None
    return ArrowSource(key, src.path, ds, where)


def without_nulls(value: Any) -> Any:
    """A row as the JSON reader gives it: Arrow fills keys that other rows have with None; drop those again."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
