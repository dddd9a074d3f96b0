"""Padding-free packing for SFT: whole samples grouped into rows of at most `max_length` tokens.

A packed row keeps the length of each sample it holds (`seq_lengths`). trl's padding-free collator turns those into
position ids that restart at 0 for every sample and drops the attention mask; transformers then builds attention
that never crosses a sample boundary: varlen kernels read the boundaries (`cu_seq_lens`) with flash attention, and
with sdpa/eager `masking_utils.find_packed_sequence_indices` detects them from the restarting position ids and
builds a block-diagonal causal mask (this needs `use_cache=False`, which trl's SFTTrainer sets). The collator also
masks the label of each sample's first token, so no sample is trained to predict the next one.
"""

from __future__ import annotations

import bisect
import random
from typing import Any


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity: longest first, each into the fullest bin that
    still has room (best fit decreasing; few bins, deterministic). Lengths above capacity get a bin of their own."""
    import numpy as np

    if not len(lengths):
        return []
    array = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(array)), -array)).tolist()  # longest first, ties by index
    shortest = int(array.min())
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted; bins too full for any sample leave it
    for i in order:
        n = int(array[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            if room - n >= shortest:
                bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            if capacity - n >= shortest:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def packed_bins(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """The sample indices of each packed row, in row order (rows shuffled with `seed`, samples in dataset order)."""
    bins = best_fit_decreasing(lengths, capacity)
    for b in bins:
        b.sort()  # within a row, samples keep their (already shuffled) dataset order
    random.Random(seed).shuffle(bins)
    return bins


def pack(input_ids: list[list[int]], labels: list[list[int]], capacity: int, seed: int) -> dict[str, list[Any]]:
    """Columns `input_ids`, `labels`, `seq_lengths` of packed rows (row order shuffled with `seed`)."""
    bins = packed_bins([len(x) for x in input_ids], capacity, seed)
    return {
        "input_ids": [[t for i in b for t in input_ids[i]] for b in bins],
        "labels": [[t for i in b for t in labels[i]] for b in bins],
        "seq_lengths": [[len(input_ids[i]) for i in b] for b in bins],
    }


def unpack(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) samples of a dataset row, packed or not."""
    lengths = row.get("seq_lengths") or [len(row["input_ids"])]
    out, start = [], 0
    for n in lengths:
        out.append((row["input_ids"][start : start + n], row["labels"][start : start + n]))
        start += n
    return out
