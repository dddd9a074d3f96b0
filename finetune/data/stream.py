"""`data.streaming: true`, reading: each training source opened lazily as a `datasets.IterableDataset` (local files
by the `datasets` builders in streaming mode; Hub datasets with `load_dataset(..., streaming=True)`), split between
processes with `datasets.distributed.split_dataset_by_node` (whole files per process when their count divides by
the process count, else every n-th row), normalised row by row and mixed by weight.

`examples(...)` is the one entry point: the normalised examples one process trains on in one pass, in a fixed order
(the same seed, pass and process always give the same sequence, which is what resuming replays). The tokenizing,
shuffling and packing around it live in `finetune.data.stream_train`.

A line the readers cannot parse (a truncated write deep in a file) or a row its format rejects is named by file and
line, in training as in `check_streamed`: the checks before training (and `ft validate`) read the first `HEAD_ROWS`
rows of each local source, `ft validate --full` every row, one at a time.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data import formats
from finetune.data.arrow import without_nulls
from finetune.data.readers import SUFFIXES, Table, data_files, is_saved_dataset
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig, DatasetSource

_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
HEAD_ROWS = 2000  # rows of a streamed source read for the checks (`ft validate` without --full), dry run and preview


def open_stream(src: DatasetSource, key: str):
    """One source as an IterableDataset, nothing read yet (a Hub id: `load_dataset(..., streaming=True)`).

    Raises:
        FinetuneError: The path does not exist and is no Hub id, the Hub dataset cannot be streamed, or a folder
            mixes file types.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(src.path)
    if is_saved_dataset(path):
        ds = load_from_disk(str(path))
        ds = ds[src.split] if hasattr(ds, "keys") else ds
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000)))
    if not path.exists():
        from finetune.recipe.checks import looks_like_hub_id

        if not looks_like_hub_id(src.path):
            raise FinetuneError(f"{key}: '{src.path}' does not exist (resolved against {Path.cwd()})")
        try:
            return load_dataset(src.path, name=src.subset, revision=src.revision, split=src.split, streaming=True)
        except Exception as e:
            raise FinetuneError(f"{key}: cannot stream the Hub dataset '{src.path}' (subset {src.subset}, split "
                                f"{src.split}): {e}") from None
    files = data_files(path, key)
    kinds = {_BUILDERS[SUFFIXES[f.suffix.lower()]] for f in files}
    if len(kinds) > 1:
        raise FinetuneError(f"{key}: '{src.path}' mixes file types ({', '.join(sorted(kinds))}); a streamed source "
                            "holds one type; give each type its own entry under data.train")
    try:
        return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", streaming=True)
    except StopIteration:  # the builder reads the first rows for the columns
        raise FinetuneError(f"{key}: '{src.path}' holds no rows") from None


def _shown(row: dict[str, Any]) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= 160 else text[:157] + "..."



def open_with_first_row(src: DatasetSource, key: str):
    """The source as a stream under the recipe's column names, and its first row (nulls dropped); nothing else is
    read. Raises FinetuneError when it holds no rows."""
    ds = open_stream(src, key)
    for fieldname, col in src.columns.items():
        if col != fieldname:
            ds = ds.rename_column(col, fieldname)
    try:
        return ds, without_nulls(next(iter(ds)))
    except StopIteration:
        raise FinetuneError(f"{key}: '{src.path}' holds no rows") from None
    except FinetuneError:
        raise
    except Exception as e:  # the Arrow readers under `datasets` read a chunk of lines ahead of the first row
        raise FinetuneError(unreadable(src, key, 0, e)) from None

class Source:
    """One training source as this process reads it: its rows (this process's share), format and recipe key."""

    def __init__(self, src: DatasetSource, key: str, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node

        self.src, self.key, self.rank, self.world = src, key, rank, world
        ds, first = open_with_first_row(src, key)
        self.format, notice = formats.resolve_format(Table(key, src.path, [first], [(src.path, "row 1")]),
                                                     src.format)
        if notice and rank == 0:
            print(f"data: {notice}", flush=True)
        if self.format == "preference":
            raise FinetuneError(f"{key} '{src.path}': preference rows (chosen/rejected) belong to a dpo stage; a "
                                "streamed sft stage needs messages, alpaca, sharegpt, prompt_completion or text rows")
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds

    def examples(self) -> Iterator[dict[str, Any]]:
        """This process's rows of the source, normalised ({"messages": ...} or {"text": ...}), in file order (with
        `max_samples`: of the first that many rows of the source, not of a shuffled pick as without streaming).

        Raises:
            FinetuneError: A row the format rejects (shown, with the source's key and path).
        """
        rows = iter(self.dataset)
        if self.src.max_samples is not None:  # this process's share of the first max_samples rows
            rows = itertools.islice(rows, (self.src.max_samples - self.rank + self.world - 1) // self.world)
        n = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except FinetuneError:
                raise
            except Exception as e:  # the Arrow readers under `datasets` (ArrowInvalid, ...): a line they cannot parse
                raise FinetuneError(unreadable(self.src, self.key, n, e)) from None
            n, row = n + 1, without_nulls(row)
            try:
                normalised = formats.normalize_sft(Table(self.key, self.src.path, [row], [(self.src.path, "row")]),
                                                   self.format)[0]
            except FinetuneError:
                where = self._where(n)  # found only now: it reads the files up to the row
                try:
                    formats.normalize_sft(Table(self.key, self.src.path, [row], [where]), self.format)
                except FinetuneError as e:
                    raise FinetuneError(f"{self.key} '{self.src.path}': a streamed row is not a valid '{self.format}' "
                                        f"row ({' '.join(where)}): {_shown(row)}\n{e}\n{FULL_CHECK}") from None
            yield normalised

    def _where(self, n: int) -> tuple[str, str]:
        """(file, "line 5000") of this process's n-th row: counted in JSON Lines files (blank lines skipped, as the
        reader skips them) when one process reads the source whole, else (source, "row n of process r")."""
        files = _local_files(self.src, self.key)
        if self.world == 1 and files and all(SUFFIXES[f.suffix.lower()] == "jsonl" for f in files):
            return _nth_line(files, n)
        return self.src.path, f"row {n}" + (f" of process {self.rank}'s share" if self.world > 1 else "")


FULL_CHECK = "`ft validate --full RECIPE` reads streamed training files whole and names the first bad row of each."


def _local_files(src: DatasetSource, key: str) -> list[Path]:
    path = Path(src.path)
    return data_files(path, key) if path.exists() and not is_saved_dataset(path) else []


def unreadable(src: DatasetSource, key: str, n: int, error: Exception) -> str:
    """The message for a stream that failed after `n` rows: the file and line of the first line that is not JSON
    (JSON Lines sources), else the reader's own words."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for file in _local_files(src, key):
        if SUFFIXES[file.suffix.lower()] != "jsonl":
            continue
        bad = _first_bad_line(file)
        if bad is not None:
            return f"{key}: {file} line {bad[0]} is not valid JSON ({bad[1]}); fix or drop the line. {FULL_CHECK}"
    return f"{key} '{src.path}': reading the stream failed after {n} rows ({reason}). {FULL_CHECK}"


def _nth_line(files: list[Path], n: int) -> tuple[str, str]:
    """The file and line of the n-th non-blank line across `files`."""
    seen = 0
    for file in files:
        with file.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    seen += 1
                    if seen == n:
                        return str(file), f"line {line_no}"
    return str(files[-1]), f"row {n}"


def _first_bad_line(file: Path) -> tuple[int, str] | None:
    """(line, reason) of the first non-blank line of a JSON Lines file that is not UTF-8 JSON, or None."""
    with file.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.decode("utf-8-sig" if line_no == 1 else "utf-8"))
            except UnicodeDecodeError:
                return line_no, "not UTF-8"
            except json.JSONDecodeError as e:
                return line_no, e.msg
            except RecursionError:
                return line_no, "nested too deeply"
    return None


def check_source(src: DatasetSource, key: str, limit: int | None) -> tuple[int, str | None]:
    """Read the first `limit` rows of a streamed training source (None: all of it) as training reads them, in one
    process, row by row (memory stays flat): (rows read, the first problem or None)."""
    n = 0
    try:
        source = Source(src, key, 0, 1)
        for _ in itertools.islice(source.examples(), limit):
            n += 1
    except FinetuneError as e:
        return n, str(e)
    return n, None


def sources(data: DataConfig, rank: int, world: int) -> list[Source]:
    """The training sources of a streaming stage, opened for process `rank` of `world` (the first row of each is
    read now, to find its format: a missing file or an empty source fails before the model loads)."""
    return [Source(src, f"data.train[{i}]", rank, world) for i, src in enumerate(data.train)]


def examples(opened: list[Source], data: DataConfig, seed: int, epoch: int, rank: int) -> Iterator[dict[str, Any]]:
    """One pass over the sources, mixed: one after the other without weights; with weights, each next example
    drawn from a source chosen with those probabilities (seeded by seed, pass and process) until every source has
    been read to its end once (smaller sources start over meanwhile, as `interleave_datasets(...,
    stopping_strategy="all_exhausted")`)."""
    if not any(src.weight for src in data.train):
        for source in opened:
            yield from source.examples()
        return
    rng = random.Random(f"{seed}:{epoch}:{rank}:mix")
    weights = [src.weight or 0.0 for src in data.train]
    iters = [source.examples() for source in opened]
    finished = [w <= 0 for w in weights]  # a zero weight is never drawn: count it as read
    while not all(finished):
        (k,) = rng.choices(range(len(iters)), weights=weights)
        try:
            yield next(iters[k])
        except StopIteration:
            finished[k] = True
            if all(finished):
                return
            iters[k] = opened[k].examples()
            try:
                yield next(iters[k])
            except StopIteration:  # this process's share of the source is empty
                weights[k] = 0.0
                if not any(weights):
                    return


def check_streamed(data: DataConfig, prefix: str, full: bool) -> list[str]:
    """The first problem of each local streamed training source of a data section, reading `HEAD_ROWS` rows of each
    (every row when `full`); Hub sources are left to training."""
    problems = []
    for j, src in enumerate(data.train):
        if Path(src.path).exists():
            _, problem = check_source(src, f"{prefix}.train[{j}]", None if full else HEAD_ROWS)
            problems += [problem] if problem else []
    return problems


def streamed_read(recipe: Any, full: bool) -> str:
    """What `ft validate` read of streamed training sources ('' when the recipe streams none)."""
    keys = [f"{'data' if stage.data is None else f'stages[{i}].data'}.train[{j}]"
            for i, stage in enumerate(recipe.effective_stages()) if recipe.stage_data(stage).streaming
            for j, src in enumerate(recipe.stage_data(stage).train) if Path(src.path).exists()]
    if not keys:
        return ""
    if full:
        return f"; streamed training sources ({', '.join(dict.fromkeys(keys))}) read whole (--full)"
    return (f"; of streamed training sources ({', '.join(dict.fromkeys(keys))}) only the first {HEAD_ROWS} rows of "
            "each were read (training reads the rest as it goes): `ft validate --full` reads them whole")
