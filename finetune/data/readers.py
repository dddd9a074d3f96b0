"""Read the rows of a data source: local jsonl/json/parquet/csv files, a folder of them, a `save_to_disk` folder, or
a Hugging Face Hub dataset. Every row keeps where it came from (file and line), so later errors can name it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe.schema import DatasetSource

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
TOO_DEEP_TO_READ = ("nests JSON objects and lists too deeply for the JSON parser (about 1000 levels; tool call "
                    "arguments, results and schemas may nest 64): flatten the row or drop it")


@dataclass
class Table:
    """The rows of one source and, for each, the file and line (or row) it came from."""

    key: str  # recipe key of the source, e.g. "data.train[0]"
    path: str
    rows: list[dict[str, Any]]
    origins: list[tuple[str, str]]  # (file, "line 3" / "row 3") per row

    def where(self, i: int, short: bool = False) -> str:
        """Human location of row i: `data/x.jsonl line 3` (`line 3` when short and the source is that file)."""
        file, pos = self.origins[i]
        return pos if short and file == self.path else f"{file} {pos}"


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / m).exists() for m in _SAVED_MARKERS)


def data_files(path: Path, key: str) -> list[Path]:
    """The data files of a local source: the file itself, or the supported files of a folder (sorted)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise FinetuneError(f"{key}: '{path}' has an unsupported extension '{path.suffix}'; supported: "
                                f"{', '.join(SUFFIXES)} files, a folder of them, a save_to_disk folder or a Hub id")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise FinetuneError(f"{key}: the folder '{path}' holds no {', '.join(SUFFIXES)} files and is not a "
                            "save_to_disk dataset")
    return files


def read_source(src: DatasetSource, key: str) -> Table:
    """All rows of a source, in file order.

    Args:
        src: The recipe's dataset entry.
        key: Its recipe key (used in error messages), e.g. `data.train[0]`.

    Raises:
        FinetuneError: Unreadable or malformed file, invalid UTF-8, no rows, or a Hub dataset that cannot be loaded.
    """
    path = Path(src.path)
    if is_saved_dataset(path) or not path.exists():
        dataset = _load_saved(path, src, key) if path.exists() else _load_hub(src, key)
        table = Table(key, src.path, dataset.to_list(), [(src.path, f"row {i + 1}") for i in range(len(dataset))])
    else:
        table = Table(key, src.path, [], [])
        for file in data_files(path, key):
            rows, positions = _read_file(file, key)
            table.rows += rows
            table.origins += [(str(file), pos) for pos in positions]
    if not table.rows:
        raise FinetuneError(f"{key}: '{src.path}' holds no rows")
    for i, row in enumerate(table.rows):
        if not isinstance(row, dict):
            raise FinetuneError(f"{key}: {table.where(i)} is a {type(row).__name__}, not an object with named fields")
    return table


def _decode(raw: bytes, file: Path, key: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FinetuneError(f"{key}: {file} line {line} is not valid UTF-8 (byte {e.start}); re-encode the file "
                            "as UTF-8") from None


def _read_file(file: Path, key: str) -> tuple[list[Any], list[str]]:
    kind = SUFFIXES[file.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(file).to_pylist()
            return rows, [f"row {i + 1}" for i in range(len(rows))]
        raw = file.read_bytes()
    except OSError as e:
        raise FinetuneError(f"{key}: cannot read {file} ({e.strerror or e})") from None
    except Exception as e:  # pyarrow raises its own classes for corrupt files
        raise FinetuneError(f"{key}: cannot read {file} as parquet ({e})") from None
    text = _decode(raw, file, key)
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows, positions = [], []
        try:
            for row in reader:
                rows.append(dict(row))
                positions.append(f"line {reader.line_num}")
        except csv.Error as e:
            raise FinetuneError(f"{key}: {file} line {reader.line_num} is not valid CSV ({e})") from None
        return rows, positions
    if kind == "json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise FinetuneError(f"{key}: {file} {TOO_DEEP_TO_READ}") from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise FinetuneError(f"{key}: {file} line {e.lineno} is not valid JSON ({e.msg})") from None
            return json_lines(text, file, key)  # a JSON Lines file named .json
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise FinetuneError(f"{key}: {file} holds a JSON {type(data).__name__}; expected a list of rows")
        return data, [f"row {i + 1}" for i in range(len(data))]
    return json_lines(text, file, key)


def json_lines(text: str, file: Path | str, key: str) -> tuple[list[Any], list[str]]:
    """The rows of JSON Lines text and where each was (`line N`); a bad line raises a FinetuneError naming `key`,
    the file and the line."""
    rows, positions = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{key}: {file} line {n} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise FinetuneError(f"{key}: {file} line {n} {TOO_DEEP_TO_READ}") from None
            positions.append(f"line {n}")
    return rows, positions


def _load_saved(path: Path, src: DatasetSource, key: str):
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as e:
        raise FinetuneError(f"{key}: cannot load the save_to_disk folder '{path}' ({e})") from None
    if isinstance(loaded, DatasetDict):
        if src.split not in loaded:
            raise FinetuneError(f"{key}: '{path}' has no split '{src.split}' (splits: {', '.join(loaded)}); set "
                                f"{key}.split")
        return loaded[src.split]
    return loaded


def _load_hub(src: DatasetSource, key: str):
    from finetune.recipe.checks import hub_offline_reason, looks_like_hub_id

    if not looks_like_hub_id(src.path):
        raise FinetuneError(f"{key}: '{src.path}' does not exist (resolved against {Path.cwd()})")
    from datasets import load_dataset

    try:
        return load_dataset(src.path, name=src.subset, revision=src.revision, split=src.split)
    except Exception as e:
        reason = hub_offline_reason()
        if reason is not None:
            raise FinetuneError(
                f"{key}: the Hub dataset '{src.path}' cannot be loaded: the Hub cannot be reached ({reason}) and no "
                f"usable copy is in the local cache. Download it where you have access (`hf download {src.path} "
                f"--repo-type dataset --local-dir DIR`) and set {key}.path to DIR."
            ) from None
        raise FinetuneError(f"{key}: cannot load the Hub dataset '{src.path}' (subset {src.subset}, split "
                            f"{src.split}, revision {src.revision}): {e}") from None


def fingerprint(src: DatasetSource, key: str) -> str:
    """A hash of the source's content: file bytes for local data, the datasets fingerprint for Hub datasets."""
    path = Path(src.path)
    h = hashlib.blake2b(digest_size=16)
    if not path.exists():
        h.update(f"hub:{src.path}:{src.subset}:{src.split}:{src.revision}:".encode())
        h.update(_load_hub(src, key)._fingerprint.encode())
        return h.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if is_saved_dataset(path) else data_files(path, key)
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        h.update(_file_digest(file, key))
    h.update(f":{src.split}".encode())
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int], bytes] = {}  # (path, size, mtime): a run hashes a file once, not once per check


def _file_digest(file: Path, key: str) -> bytes:
    try:
        stat = file.stat()
        memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _DIGESTS:
            h = hashlib.blake2b(digest_size=16)
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            _DIGESTS[memo] = h.digest()
        return _DIGESTS[memo]
    except OSError as e:
        raise FinetuneError(f"{key}: cannot read {file} ({e.strerror or e})") from None
