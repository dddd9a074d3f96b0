"""SFT preprocessing on Arrow: each source normalised and tokenized by `Dataset.map` in `data.num_proc` processes,
written batch by batch to Arrow files and memory-mapped back; selection, statistics and packing then work on
index and length arrays. No step holds all rows (or all token lists) as Python objects.

Every row gets a status (trained, or why not) and its counts, so the report and the errors are the ones the list
path gives: format problems over the whole source, encoding problems over the rows the split uses, named by file and
line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data import formats
from finetune.data.arrow import ArrowSource, cores, without_nulls
from finetune.data.encode import IGNORE, Encoded, EncodeError, encode_example, fit_length
from finetune.data.encode_many import encode_many
from finetune.data.readers import Table
from finetune.data.templates import TemplateInfo
from finetune.recipe.schema import DataConfig

OK, BAD_FORMAT, BAD_ENCODE, UNTRAINABLE, TOO_LONG, MASKED = range(6)
ROWS_PER_PROCESS = 2000  # fewer rows than this per process: starting processes costs more than it saves
NO_ANSWER = "no assistant turn, so nothing to train on (add the answer, or remove these rows)"
ENCODE, UNTRAINABLE_HEADER = "rows the chat template cannot encode", "rows with nothing to train on"
# the counts of tool use and reasoning a sample carries (encode.Encoded.stats), summed into DataReport.stats
STATS = ("tool_calls", "tool_results", "trained_all", "reasoning_turns", "reasoning_rendered", "reasoning_trained",
         "special_text")  # special_text: rows whose messages hold special-token text (escaped or allowed)
SOMETIMES = ("trained_all", "special_text")  # in the report only when not 0


def count(report: Any, r: dict[str, Any], times: int = 1) -> None:
    """Add one row result (trained, too long or fully masked) to the report's counts."""
    report.assistant_turns += r["turns"] * times
    report.turns_without_eot += r["no_eot"] * times
    report.dropped_too_long += (r["status"] == TOO_LONG) * times
    report.truncated += bool(r["truncated"]) * times
    report.turns_cut += r["cut"] * times
    report.dropped_fully_masked += (r["status"] == MASKED) * times
    report.tokens += r["tokens"] * times
    report.trained_tokens += r["trained"] * times
    for name in STATS:  # every count, as encode gives them (SOMETIMES only when set)
        if r.get(name) or name not in SOMETIMES:
            report.stats[name] = report.stats.get(name, 0) + r.get(name, 0) * times


def all_dropped(n: int, data: DataConfig, report: Any, split: str) -> str:
    """The error when no sample of a split is left."""
    return (f"data ({split}): all {n} samples were dropped ({report.dropped_too_long} longer than "
            f"max_length {data.max_length} with length_policy drop, {report.dropped_fully_masked} with no trained "
            "token: no assistant turn, or the prompt alone fills max_length). Raise data.max_length, use "
            "length_policy: truncate, or check the data has assistant turns.")


def row_results(tokenizer: Any, examples: list[dict[str, Any]], data: DataConfig,
                template: TemplateInfo) -> list[dict[str, Any]]:
    """`row_result` of many examples, tokenized in one call per kind (chat or plain text): the same results."""
    return [row_result(tokenizer, ex, data, template, sample)
            for ex, sample in zip(examples, encode_many(tokenizer, examples, data, template), strict=True)]


def row_result(tokenizer: Any, ex: dict[str, Any], data: DataConfig, template: TemplateInfo,
               sample: Encoded | EncodeError | None = None) -> dict[str, Any]:
    """What preprocessing does with one example: status, the fitted sample, problem text and the report's counts.
    `sample`: the example already encoded (`row_results`), else it is encoded here."""
    out = {"status": OK, "input_ids": [], "labels": [], "problem": "", "turns": 0, "no_eot": 0, "truncated": False,
           "cut": 0, "tokens": 0, "trained": 0, **dict.fromkeys(STATS, 0)}
    try:
        if sample is None:
            sample = encode_example(tokenizer, ex, data, template)
        elif isinstance(sample, EncodeError):
            raise sample
    except EncodeError as e:
        return {**out, "status": BAD_ENCODE, "problem": str(e)}
    if "messages" in ex and data.train_on != "all" and not sample.assistant_turns:
        return {**out, "status": UNTRAINABLE, "problem": NO_ANSWER}
    out["turns"], out["no_eot"] = sample.assistant_turns, sample.turns_without_eot
    out.update({name: sample.stats.get(name, 0) for name in STATS})
    fitted = fit_length(sample, data.max_length, data.length_policy)
    if fitted is None:
        return {**out, "status": TOO_LONG}
    if fitted is not sample:
        out["truncated"] = True
        if template.end_of_turn_id is not None:
            out["cut"] = sample.labels[data.max_length :].count(template.end_of_turn_id)
    trained = sum(t != IGNORE for t in fitted.labels)
    if not trained:
        return {**out, "status": MASKED}
    return {**out, "input_ids": fitted.input_ids, "labels": fitted.labels, "tokens": len(fitted.input_ids),
            "trained": trained}


def _normalised(rows: list[dict[str, Any]], fmt: str, key: str, path: str) -> list[dict[str, Any] | None]:
    """The normalised examples of a batch of raw rows; None for a row the format rejects."""
    try:
        return formats.normalize_sft(Table(key, path, rows, [(path, "")] * len(rows)), fmt)
    except Exception:  # noqa: BLE001 - some row is bad: find which, one by one
        out: list[dict[str, Any] | None] = []
        for row in rows:
            try:
                out.append(formats.normalize_sft(Table(key, path, [row], [(path, "")]), fmt)[0])
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def _batch(batch: dict[str, list], *, tokenizer: Any, data: DataConfig, template: TemplateInfo, fmt: str, key: str,
           path: str) -> dict[str, list]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    rows = [without_nulls({c: batch[c][j] for c in names}) for j in range(n)]
    normalised = _normalised(rows, fmt, key, path)
    encoded = iter(row_results(tokenizer, [ex for ex in normalised if ex is not None], data, template))
    results = [{"status": BAD_FORMAT} if ex is None else next(encoded) for ex in normalised]
    empty = {"input_ids": [], "labels": [], "problem": "", "turns": 0, "no_eot": 0, "truncated": False, "cut": 0,
             "tokens": 0, "trained": 0, **dict.fromkeys(STATS, 0)}
    results = [{**empty, **r} for r in results]
    return {c: [r[c] for r in results] for c in ("status", *empty)}


def _features():
    from datasets import Features, Sequence, Value

    ints = {c: Value("int32") for c in ("turns", "no_eot", "cut", "tokens", "trained", *STATS)}
    return Features({"status": Value("int8"), "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "problem": Value("string"), **ints, "truncated": Value("bool")})


def tokenized(source: ArrowSource, fmt: str, tokenizer: Any, data: DataConfig, template: TemplateInfo,
              fingerprint: str, cache_dir: str | None, split: str):
    """The source's rows mapped to status, ids, labels and counts (a memory-mapped Dataset, cached by datasets)."""
    ds = source.dataset
    procs = max(1, min(data.num_proc or cores(), len(ds) // ROWS_PER_PROCESS))
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([ds._fingerprint, fingerprint, fmt, source.key]).encode())
    fp = h.hexdigest()
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokenized-{fp}.arrow")
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    if len(ds) < 5000:
        disable_progress_bars()
    try:
        return ds.map(_batch, batched=True, batch_size=500, num_proc=procs if procs > 1 else None,
                      remove_columns=ds.column_names, features=_features(), new_fingerprint=fp,
                      fn_kwargs={"tokenizer": tokenizer, "data": data, "template": template, "fmt": fmt,
                                 "key": source.key, "path": source.path},
                      desc=f"data: tokenizing {source.key} ({split}, {procs} process{'es' * (procs > 1)})", **kwargs)
    finally:
        if not quiet:
            enable_progress_bars()


def column(ds: Any, name: str) -> np.ndarray:
    """A scalar column of a Dataset without indices mapping, as a numpy array (read from Arrow, not as Python)."""
    return ds.data.column(name).to_numpy()


def lengths(ds: Any, name: str = "input_ids") -> np.ndarray:
    """The length of every list in a list column (Arrow compute; ignores any indices mapping: use on mapped data)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column(name)).to_numpy(zero_copy_only=False)


def packed(samples: Any, capacity: int, seed: int, work_dir: str | None):
    """The samples (a Dataset with input_ids and labels, in training order) packed into rows of at most `capacity`
    tokens: the same rows as `packing.pack`, gathered batch by batch into a new memory-mapped Dataset."""
    from datasets import Dataset, Features, Sequence, Value

    from finetune.data.packing import packed_bins

    bins = packed_bins(samples_lengths(samples), capacity, seed)
    members = Dataset.from_dict({"members": bins}, features=Features({"members": Sequence(Value("int64"))}))
    del bins

    def gather(batch: dict[str, list]) -> dict[str, list]:
        flat = [i for b in batch["members"] for i in b]
        got = samples[flat]
        ids, labels, out_ids, out_labels, out_lengths, k = got["input_ids"], got["labels"], [], [], [], 0
        for b in batch["members"]:
            part = range(k, k + len(b))
            out_ids.append([t for j in part for t in ids[j]])
            out_labels.append([t for j in part for t in labels[j]])
            out_lengths.append([len(ids[j]) for j in part])
            k += len(b)
        return {"input_ids": out_ids, "labels": out_labels, "seq_lengths": out_lengths}

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "seq_lengths": Sequence(Value("int32"))})
    kwargs: dict[str, Any] = {}
    if work_dir is None and samples.cache_files:  # beside the tokenized rows (no data.cache_dir)
        work_dir = str(Path(samples.cache_files[0]["filename"]).parent)
    if work_dir is not None:
        h = hashlib.blake2b(f"{samples._fingerprint}:{capacity}:{seed}".encode(), digest_size=16).hexdigest()
        kwargs["cache_file_name"] = str(Path(work_dir) / f"packed-{h}.arrow")
    return members.map(gather, batched=True, batch_size=200, remove_columns=["members"], features=features,
                       new_fingerprint=f"packed-{samples._fingerprint}-{capacity}-{seed}",
                       desc="data: packing", **kwargs)


def samples_lengths(samples: Any) -> list[int]:
    """Token count of every sample of a Dataset that may carry an indices mapping (a `select` of mapped data)."""
    all_lengths = lengths(samples)
    if samples._indices is None:
        return all_lengths.tolist()
    return all_lengths[samples._indices.column(0).to_numpy()].tolist()
