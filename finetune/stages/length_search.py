"""The longest sample that fits a memory cap, by the estimate (`ft train --dry-run --max-length-search CAP`)."""

from __future__ import annotations

import re
from typing import Any

from finetune.model import tiled_mlp
from finetune.stages.memory import Memory, recipe_estimate, sequences_per_micro_batch


def parse_size(text: str) -> int:
    """Bytes from a size such as `8GB`, `8G`, `24 GiB`, `500MB` or a plain number of bytes (GB counted as GiB, as the
    estimate prints them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"'{text}' is not a memory size; write it like 8GB, 500MB or 24GiB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def longest_fitting(config: Any, recipe: Any, stage: Any, cap: int, trainable: int | None = None,
                    labelled_share: float = 1.0) -> tuple[int, Memory] | None:
    """The longest sample (tokens per sequence) whose training step fits `cap` bytes by the estimate, with the
    stage's micro batch, and the estimate at that length; None when not even one token fits (the weights alone are
    too large). Searched by bisection up to the model's context (`max_position_embeddings`), the estimate growing
    with length. `labelled_share`: the share of tokens carrying a label (1: the worst case)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
    sequences = sequences_per_micro_batch(stage.kind, recipe.stage_training(stage).micro_batch_size)

    def at(length: int) -> Memory:
        labelled = int(sequences * length * labelled_share)
        return recipe_estimate(config, recipe, stage, seq_len=length, labelled=labelled, trainable=trainable)

    # `tiled_mlp: auto` tiles rows longer than AUTO_FROM: the estimate drops there, and grows with length on each side
    segments = [(1, context)]
    if getattr(recipe.stage_training(stage), "tiled_mlp", "off") == "auto" and context > tiled_mlp.AUTO_FROM:
        segments = [(tiled_mlp.AUTO_FROM + 1, context), (1, tiled_mlp.AUTO_FROM)]
    for low, high in segments:
        if at(low).total > cap:
            continue
        if at(high).total <= cap:
            return high, at(high)
        while high - low > 1:  # at(low) fits, at(high) does not
            mid = (low + high) // 2
            low, high = (mid, high) if at(mid).total <= cap else (low, mid)
        return low, at(low)
    return None

