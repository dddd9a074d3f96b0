"""`ft train --dry-run` counts tokens without holding the data: its memory stays flat as rows grow, like training's
(issue 33, item 13: 3,050 MB of Python lists for 400k chat rows, where training peaks at 583 MB)."""

from __future__ import annotations

import tracemalloc

from datasets import Dataset

from finetune.data.encode import IGNORE
from finetune.stages.dryrun import sft_counts


def tokenized(rows: int, length: int = 48) -> Dataset:
    """Rows as `prepare` leaves them: input_ids and labels, the first half of each row masked."""
    ids = list(range(length))
    labels = [IGNORE] * (length // 2) + ids[length // 2:]
    return Dataset.from_dict({"input_ids": [ids] * rows, "labels": [labels] * rows})


def _peak(dataset: Dataset) -> tuple[tuple[int, int, int], int]:
    tracemalloc.start()
    try:
        counts = sft_counts(dataset, batch_rows=500)
        return counts, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_counts_are_right_and_memory_does_not_grow_with_rows():
    small, large = tokenized(2_000), tokenized(20_000)
    (tokens, trained, longest), small_peak = _peak(small)
    assert (tokens, trained, longest) == (2_000 * 48, 2_000 * 24, 48)
    counts, large_peak = _peak(large)
    assert counts == (20_000 * 48, 20_000 * 24, 48)
    # whole columns as Python lists grow 10x with 10x the rows (about 10 MB here); batches of 500 rows stay put
    assert large_peak < 1.5 * small_peak + 256 * 1024, (small_peak, large_peak)
