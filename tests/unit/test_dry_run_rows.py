"""`ft train --dry-run` and `ft data preview` show samples and a length histogram without holding every sample: their
memory stays flat as rows grow, like training's (issue 33, item 13: 3,050 MB for 400k chat rows, where training
peaks at 583 MB)."""

from __future__ import annotations

import tracemalloc

from datasets import Dataset
from transformers import AutoTokenizer

from finetune.data.build import DataReport, Prepared
from finetune.data.encode import IGNORE
from finetune.data.preview import preview_lines
from finetune.data.templates import TemplateInfo


def tokenized(rows: int, length: int = 48) -> Prepared:
    """Rows as `prepare` leaves them: input_ids and labels, the first half of each row masked."""
    ids = list(range(4, 4 + length))
    labels = [IGNORE] * (length // 2) + ids[length // 2:]
    dataset = Dataset.from_dict({"input_ids": [ids] * rows, "labels": [labels] * rows})
    return Prepared(dataset, DataReport(kind="sft", split="train", samples=rows, rows=rows))


def _preview_peak(prepared: Prepared, tokenizer) -> tuple[list[str], int]:
    template = TemplateInfo("tokenizer", "<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    tracemalloc.start()
    try:
        lines, _ = preview_lines(prepared, tokenizer, template, 1, 64, color=False)
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_preview_memory_does_not_grow_with_rows(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    _preview_peak(tokenized(100), tokenizer)  # first calls import and cache what they need
    small_lines, small_peak = _preview_peak(tokenized(2_000), tokenizer)
    large_lines, large_peak = _preview_peak(tokenized(20_000), tokenizer)
    assert "--- sample 1 of 20000: 48 tokens, 24 trained (50.0%)" in large_lines
    assert "lengths in tokens (20000 samples, max_length 64):" in large_lines
    assert any(line.rstrip().endswith(" 20000") for line in large_lines)  # every sample in the histogram
    assert "lengths in tokens (2000 samples, max_length 64):" in small_lines
    # every sample as Python lists grows 10x with 10x the rows (about 20 MB here); lengths alone are 4 bytes each
    assert large_peak < small_peak + 512 * 1024, (small_peak, large_peak)
