"""Which rows of each source a split uses, in which order: shuffle, `max_samples`, eval hold-out, weighted mix.

Works on row counts and index arrays only, so the list reader and the Arrow path pick exactly the same rows.
"""

from __future__ import annotations

import random

import numpy as np

from finetune.recipe.schema import DataConfig, DatasetSource


def source_order(data: DataConfig, key: str, src: DatasetSource, n: int, seed: int, split: str,
                 held_out: bool) -> list[int]:
    """Row indices of one source used by the split (before weighting), in training order."""
    order = list(range(n))
    if data.shuffle:
        random.Random(f"{seed}:{key}").shuffle(order)  # str seeds are hashed stably (not by PYTHONHASHSEED)
    order = order[: src.max_samples] if src.max_samples else order
    if held_out:  # the last eval_fraction of each source's rows is the eval split, the rest is train
        n_eval = max(1, round(len(order) * data.eval_fraction)) if len(order) > 1 else 0
        order = order[len(order) - n_eval :] if split == "eval" else order[: len(order) - n_eval]
    return order


def weighted(orders: list[list[int]], weights: list[float | None]) -> list[list[int]]:
    """Each source's order repeated or cut to its share (`weight`) of the total row count."""
    total = sum(len(order) for order in orders)
    wsum = sum(w or 0 for w in weights)
    out = []
    for order, w in zip(orders, weights, strict=True):
        target = round(total * (w or 0) / wsum)
        out.append([order[i % len(order)] for i in range(target)] if order else [])
    return out


def mix_permutation(n: int, seed: int) -> np.ndarray:
    """The permutation that `random.Random(f"{seed}:mix").shuffle` applies to a list of n items."""
    perm = list(range(n))
    random.Random(f"{seed}:mix").shuffle(perm)
    return np.asarray(perm, dtype=np.int64)


def plan(data: DataConfig, sources: list[tuple[str, DatasetSource]], counts: list[int], seed: int, split: str,
         held_out: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(source index, row index) of every example of the split, in training order, and the rows used per source."""
    orders = [source_order(data, key, src, n, seed, split, held_out)
              for (key, src), n in zip(sources, counts, strict=True)]
    if split == "train" and any(src.weight for _, src in sources):
        orders = weighted(orders, [src.weight for _, src in sources])
    used = [len(o) for o in orders]
    which = np.concatenate([np.full(len(o), s, dtype=np.int64) for s, o in enumerate(orders)])
    rows = np.concatenate([np.asarray(o, dtype=np.int64) for o in orders])
    if data.shuffle and split == "train" and len(sources) > 1:
        perm = mix_permutation(len(rows), seed)
        which, rows = which[perm], rows[perm]
    return which, rows, used
