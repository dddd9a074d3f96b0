"""The SFT split on Arrow: load each source memory-mapped, tokenize it in parallel (`parallel.tokenized`), pick the
split's rows with `select.plan`, report and raise as the list path does, then select (and pack) the trained rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.data import formats, select
from finetune.data.arrow import ArrowSource, load_arrow, without_nulls
from finetune.data.cache import CACHE_VERSION, tokenizer_fingerprint
from finetune.data.parallel import (
    BAD_ENCODE,
    BAD_FORMAT,
    ENCODE,
    MASKED,
    NO_ANSWER,
    OK,
    SOMETIMES,
    STATS,
    TOO_LONG,
    UNTRAINABLE,
    UNTRAINABLE_HEADER,
    all_dropped,
    column,
    packed,
    tokenized,
)
from finetune.data.readers import Table
from finetune.data.templates import TemplateInfo
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig, DatasetSource


def _renamed(source: ArrowSource, columns: dict[str, str]) -> None:
    formats.apply_columns(Table(source.key, source.path, [], []), columns)  # unknown field names raise
    ds = source.dataset
    for fieldname, col in columns.items():
        if col in ds.column_names and col != fieldname:
            if fieldname in ds.column_names:
                ds = ds.remove_columns(fieldname)
            ds = ds.rename_column(col, fieldname)
    source.dataset = ds


def _raise_format_problems(source: ArrowSource, fmt: str, status: np.ndarray) -> None:
    """Re-run the format check on the rows it rejected, so its message (counts, rows, fix) is the list path's."""
    bad = np.nonzero(status == BAD_FORMAT)[0].tolist()
    if not bad:
        return
    rows = [without_nulls(source.dataset[i]) for i in bad]
    formats.normalize_sft(Table(source.key, source.path, rows, source.origins(bad)), fmt)
    raise FinetuneError(f"{source.key} '{source.path}': {len(bad)} rows cannot be read as '{fmt}' rows")


def arrow_sft(data: DataConfig, sources: list[tuple[str, DatasetSource]], tokenizer: Any, template: TemplateInfo,
              seed: int, split: str, held_out: bool, report: Any, work_dir: str | None):
    """The split's Dataset (input_ids, labels[, seq_lengths]), memory-mapped; None when a source needs the list
    reader. Fills `report` as the list path does.

    Raises:
        FinetuneError: Bad rows (named by file and line), or no sample left.
    """
    from datasets import concatenate_datasets

    loaded = []
    for key, src in sources:
        source = load_arrow(src, key, work_dir)
        if source is None:
            return None
        loaded.append(source)
    settings = data.model_dump(mode="json", include={"train_on", "max_length", "length_policy", "template",
                                                    "special_tokens_in_content"})
    fingerprint = f"{CACHE_VERSION}:{tokenizer_fingerprint(tokenizer)}:{settings}"
    parts, statuses = [], []
    for (key, src), source in zip(sources, loaded, strict=True):
        _renamed(source, src.columns)
        first = without_nulls(source.dataset[0])
        fmt, notice = formats.resolve_format(Table(key, src.path, [first], [(src.path, "row 1")]), src.format)
        if notice:
            print(f"data: {notice}", flush=True)
        if fmt == "preference":  # the list path's message
            formats.normalize_sft(Table(key, src.path, [], []), fmt)
        part = tokenized(source, fmt, tokenizer, data, template, fingerprint, work_dir, split)
        status = column(part, "status")
        _raise_format_problems(source, fmt, status)
        parts.append(part)
        statuses.append(status)
        report.sources.append({"key": key, "path": src.path, "format": fmt, "rows": len(part), "used": 0})
    which, rows, used = select.plan(data, sources, [len(p) for p in parts], seed, split, held_out)
    for s, n in enumerate(used):
        report.sources[s]["used"] = n
    if not len(rows):
        raise FinetuneError(f"data ({split}): no samples left after max_samples / eval_fraction / weights")
    offsets = np.cumsum([0, *(len(p) for p in parts)])[:-1]
    status = np.concatenate(statuses)
    flat = offsets[which] + rows  # index into all sources' rows, in training order
    _raise_row_problems(loaded, parts, which, rows, status[flat])
    _fill_report(report, parts, flat, status)
    keep = flat[status[flat] == OK]
    if not len(keep):
        raise FinetuneError(all_dropped(len(flat), data, report, split))
    every = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    samples = every.select_columns(["input_ids", "labels"]).select(keep)
    report.samples = len(samples)
    if data.packing and split == "train":
        samples = packed(samples, data.max_length, seed, work_dir)
    report.rows = len(samples)
    return samples


def _raise_row_problems(loaded: list[ArrowSource], parts: list, which: np.ndarray, rows: np.ndarray,
                        status: np.ndarray) -> None:
    """Rows the template cannot encode or with nothing to train on, among the used ones, reported per source."""
    bad = np.nonzero((status == BAD_ENCODE) | (status == UNTRAINABLE))[0]
    if not len(bad):
        return
    problems: dict[tuple[int, str], tuple[formats.Problems, list[int]]] = {}
    for j in bad.tolist():
        s, i = int(which[j]), int(rows[j])
        header = ENCODE if status[j] == BAD_ENCODE else UNTRAINABLE_HEADER
        if (s, header) not in problems:
            problems[(s, header)] = (formats.Problems(Table(loaded[s].key, loaded[s].path, [], [])), [])
        p, ids = problems[(s, header)]
        message = parts[s][i]["problem"] if status[j] == BAD_ENCODE else NO_ANSWER
        p.add(message, len(ids))
        ids.append(i)
    for (s, header), (p, ids) in problems.items():
        p.table.origins = loaded[s].origins(ids)
        p.raise_if_any(header)


def _fill_report(report: Any, parts: list, flat: np.ndarray, status: np.ndarray) -> None:
    """The report's counts over the used rows (a row used twice by a weighted mix counts twice)."""
    from datasets import concatenate_datasets

    every = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    counted = np.isin(status[flat], (OK, TOO_LONG, MASKED))
    used = flat[counted]
    pick = lambda name: column(every, name)[used].astype(np.int64)  # noqa: E731
    report.assistant_turns += int(pick("turns").sum())
    report.turns_without_eot += int(pick("no_eot").sum())
    report.turns_cut += int(pick("cut").sum())
    report.truncated += int(pick("truncated").sum())
    st = status[used]
    report.dropped_too_long += int((st == TOO_LONG).sum())
    report.dropped_fully_masked += int((st == MASKED).sum())
    report.tokens += int(pick("tokens")[st == OK].sum())
    report.trained_tokens += int(pick("trained")[st == OK].sum())
    for name in STATS:  # tool use and reasoning, as the list path counts them (parallel.count)
        if (total := int(pick(name).sum())) or name not in SOMETIMES:
            report.stats[name] = report.stats.get(name, 0) + total
