"""From the recipe's data section to a `datasets.Dataset`: read, normalise, split, mix, tokenize, fit lengths, pack,
and cache the result. Every step is deterministic given the recipe seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.data import align_formats, cache, formats, select
from finetune.data.packing import pack
from finetune.data.parallel import (
    BAD_ENCODE,
    ENCODE,
    OK,
    UNTRAINABLE,
    UNTRAINABLE_HEADER,
    all_dropped,
    count,
    row_result,
)
from finetune.data.readers import Table, read_source
from finetune.data.sft_arrow import arrow_sft
from finetune.data.templates import TemplateInfo, applied_template
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig, DatasetSource

# Stage kinds that read the same rows as another: the reference-free pair methods train on DPO's preference pairs.
DATA_KIND = {"orpo": "dpo", "simpo": "dpo", "cpo": "dpo"}
PROGRESS_FROM = 5000  # show a progress bar when tokenizing at least this many samples
ARROW = True  # SFT preprocessing on Arrow (False: the list path, kept for sources only it reads; tests compare)


@dataclass
class DataReport:
    """What preprocessing did, for the console, `ft data preview` and the cache."""

    kind: str
    split: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # key, path, format, rows, used
    samples: int = 0  # samples in the dataset (before packing)
    rows: int = 0  # dataset rows (packed rows with packing)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_fully_masked: int = 0
    assistant_turns: int = 0
    turns_without_eot: int = 0
    turns_cut: int = 0  # assistant turns whose trained end-of-turn token was cut off by truncation
    tokens: int = 0
    trained_tokens: int = 0
    template: str = ""
    end_of_turn: str | None = None
    cache: str = "off"
    stats: dict[str, int] = field(default_factory=dict)  # tool calls, tool results, reasoning turns (encode.Encoded)
    special_tokens: str = "refuse"  # data.special_tokens_in_content, for the preview's line about stats["special_text"]

    def summary(self) -> str:
        """One line for the console."""
        what = ", ".join(f"{s['key']} {s['format']} {s['used']}/{s['rows']}" for s in self.sources)
        line = f"data ({self.split}): {self.samples} samples [{what}]"
        if self.kind == "sft":
            share = self.trained_tokens / max(self.tokens, 1)
            line += f", {self.tokens:,} tokens, {share:.1%} trained"
            if self.rows != self.samples:
                line += f", packed into {self.rows} rows"
            line += (f"; {self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
                     f"{self.dropped_fully_masked} dropped as fully masked")
        return f"{line}; cache: {self.cache}"


@dataclass
class Prepared:
    """A preprocessed split and its report."""

    dataset: Any  # datasets.Dataset
    report: DataReport


def split_sources(data: DataConfig, split: str) -> tuple[list[tuple[str, DatasetSource]], bool]:
    """(keyed sources to read, whether the split is a held-out fraction of the train sources)."""
    held_out = data.eval_fraction > 0 and not data.eval
    if split == "train" or held_out:
        return [(f"data.train[{i}]", s) for i, s in enumerate(data.train)], held_out
    return [(f"data.eval[{i}]", s) for i, s in enumerate(data.eval)], False


def prepare(data: DataConfig, tokenizer: Any, kind: str, seed: int, split: str = "train") -> Prepared | None:
    """Preprocess one split of a stage's data (from the cache when it holds it). None when the split has no data.

    Args:
        data: The stage's data section.
        tokenizer: A tokenizer prepared by `apply_template(tokenizer, data)`.
        kind: `sft` (input_ids, labels[, seq_lengths]), `dpo` and the other pair methods (prompt, chosen, rejected
            message lists), `kto` (prompt, completion, label) or `grpo` (prompt, answer; see `align_formats`).
        seed: The recipe seed (shuffling, mixing, eval hold-out, packing order).
        split: `train` or `eval`.
    """
    kind = DATA_KIND.get(kind, kind)
    if kind not in ("sft", "dpo", "kto", "grpo"):
        raise FinetuneError(f"unknown stage kind '{kind}' for data preparation")
    sources, held_out = split_sources(data, split)
    if not sources:
        return None
    template = applied_template(tokenizer, data)
    if data.streaming and split == "train" and kind == "sft":  # read whole, a stream would defeat streaming
        from finetune.data.stream_train import stream_head

        report = DataReport(kind=kind, split=split, template=template.source, end_of_turn=template.end_of_turn,
                            cache="off (streamed)")
        report.special_tokens = data.special_tokens_in_content
        return Prepared(stream_head(data, tokenizer, seed, report), report)
    key = root = None
    if data.cache_dir:
        root = Path(data.cache_dir)
        key = cache.cache_key(data, sources, tokenizer, kind, split, seed)
        hit = cache.load(root, key)
        if hit is not None:
            report = DataReport(**hit[1])
            report.cache, report.special_tokens = f"hit {root / key}", data.special_tokens_in_content
            return Prepared(hit[0], report)
    report = DataReport(kind=kind, split=split, template=template.source, end_of_turn=template.end_of_turn)
    dataset = None
    if kind == "sft" and ARROW:
        dataset = arrow_sft(data, sources, tokenizer, template, seed, split, held_out, report,
                            str(root / "arrow") if root is not None else None)
    if dataset is None:  # other kinds, or a source only the list reader reads
        report = DataReport(kind=kind, split=split, template=template.source, end_of_turn=template.end_of_turn)
        examples = _select(data, sources, kind, seed, split, held_out, report)
        if kind != "sft":  # the alignment trainers tokenize conversations themselves
            from datasets import Dataset

            _check_special_text(examples, template, data, report)
            dataset = Dataset.from_list([ex for _, _, ex in examples])
            report.samples = report.rows = len(dataset)
        else:
            dataset = _tokenize(data, tokenizer, template, examples, seed, split, report)
    if root is not None and key is not None:
        entry = cache.save(root, key, dataset, asdict(report))
        report.cache = f"miss, saved to {entry}"
        reloaded = cache.load(root, key)
        dataset = reloaded[0] if reloaded is not None else dataset
    report.special_tokens = data.special_tokens_in_content
    return Prepared(dataset, report)


def _check_special_text(examples: list, template: TemplateInfo, data: DataConfig, report: DataReport) -> None:
    """Rows of a pair, kto or grpo split whose messages hold special-token text: refused (naming file and line) or
    counted (`data.special_tokens_in_content`; trl tokenizes these rows, so `escape` is for sft stages only)."""
    from finetune.data.messages import Problem
    from finetune.data.special_text import problem, rows_with_special_text

    found = rows_with_special_text([ex for _, _, ex in examples], template.specials)
    if found:
        report.stats["special_text"] = len(found)
    if data.special_tokens_in_content != "refuse":
        return
    problems: dict[int, formats.Problems] = {}
    for k, what in found:
        table, i, _ = examples[k]
        problems.setdefault(id(table), formats.Problems(table)).add(Problem(problem(what)), i)
    for p in problems.values():
        p.raise_if_any("rows with special-token text in their messages")


def normalised_rows(table: Table, fmt: str, kind: str, key: str, src: DatasetSource
                    ) -> tuple[list[dict[str, Any]], str | None]:
    """One source's rows in the shape a stage kind trains on, and a notice to print (KTO splitting pairs), or None.

    Raises:
        FinetuneError: the rows do not fit the kind (naming the source, the row and what to do).
    """
    stage_kind, kind = kind, DATA_KIND.get(kind, kind)
    if kind == "dpo" and fmt != "preference":
        raise FinetuneError(f"{key} '{src.path}': a {stage_kind} stage needs preference rows (prompt, chosen, "
                            f"rejected); this source is '{fmt}'")
    if kind == "kto":
        return align_formats.normalize_unpaired(table, fmt)
    if kind == "grpo":
        return align_formats.normalize_prompts(table, fmt), None
    return (formats.normalize_preference(table) if kind == "dpo" else formats.normalize_sft(table, fmt)), None


def _select(data: DataConfig, sources: list[tuple[str, DatasetSource]], kind: str, seed: int, split: str,
            held_out: bool, report: DataReport) -> list[tuple[Table, int, dict[str, Any]]]:
    """Normalised examples of the split as (table, row index, example), shuffled, capped, split and mixed."""
    parts: list[tuple[Table, list[dict[str, Any]]]] = []
    for key, src in sources:
        table = read_source(src, key)
        formats.apply_columns(table, src.columns)
        fmt, notice = formats.resolve_format(table, src.format)
        if notice:
            print(f"data: {notice}", flush=True)
        normalised, notice = normalised_rows(table, fmt, kind, key, src)
        if notice:
            print(f"data: {notice}", flush=True)
        parts.append((table, normalised))
        report.sources.append({"key": key, "path": src.path, "format": fmt, "rows": len(table.rows), "used": 0})
    which, rows, used = select.plan(data, sources, [len(n) for _, n in parts], seed, split, held_out)
    for s, n in enumerate(used):
        report.sources[s]["used"] = n
    examples = [(parts[s][0], i, parts[s][1][i]) for s, i in zip(which.tolist(), rows.tolist(), strict=True)]
    if not examples:
        raise FinetuneError(f"data ({split}): no samples left after max_samples / eval_fraction / weights")
    return examples


def _tokenize(data: DataConfig, tokenizer: Any, template: TemplateInfo, examples: list, seed: int, split: str,
              report: DataReport):
    """The list path: the examples encoded one by one in this process (row_result, as the Arrow path does)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    problems: dict[tuple[int, str], formats.Problems] = {}  # (table, header) -> its rows
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for table, i, ex in tqdm(examples, desc=f"data: tokenizing ({split})", disable=len(examples) < PROGRESS_FROM,
                             mininterval=2.0):
        r = row_result(tokenizer, ex, data, template)
        if r["status"] in (BAD_ENCODE, UNTRAINABLE):
            header = ENCODE if r["status"] == BAD_ENCODE else UNTRAINABLE_HEADER
            problems.setdefault((id(table), header), formats.Problems(table)).add(r["problem"], i)
            continue
        count(report, r)
        if r["status"] == OK:
            ids.append(r["input_ids"])
            labels.append(r["labels"])
    for (_, header), p in problems.items():
        p.raise_if_any(header)
    if not ids:
        raise FinetuneError(all_dropped(len(examples), data, report, split))
    report.samples = len(ids)
    columns: dict[str, list] = {"input_ids": ids, "labels": labels}
    if data.packing and split == "train":
        columns = pack(ids, labels, data.max_length, seed)
    report.rows = len(columns["input_ids"])
    return Dataset.from_dict(columns)
