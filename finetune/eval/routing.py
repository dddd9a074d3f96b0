"""Routing statistics of Mixture-of-Experts models (issue 30): how often each layer's router picks each expert.

`expert_load` runs a few batches forward (no gradients) with transformers' `output_router_logits` and counts, per
layer, the expert slots each token's router fills (its top `num_experts_per_tok` scores); `load_line` says it in one
line. An even router gives every expert 1 / experts of the slots. `ft train --dry-run` prints it for the first rows of
the training data of MoE models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def expert_load(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Share of the routed slots each expert received: [layers, experts], each row summing to 1.

    Args:
        model: A MoE causal LM (or a peft model around one) whose forward takes `output_router_logits`.
        batches: Model inputs (`input_ids`, optionally `attention_mask`: padded positions are not counted).
    """
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    counts: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(**batch, output_router_logits=True, use_cache=False)
                mask = batch.get("attention_mask")
                keep = mask.reshape(-1).bool() if mask is not None else None
                rows = []
                for scores in out.router_logits:
                    scores = scores.reshape(-1, scores.shape[-1])
                    picked = scores[keep.to(scores.device)] if keep is not None else scores
                    rows.append(torch.bincount(picked.topk(top_k, dim=-1).indices.reshape(-1).cpu(),
                                               minlength=scores.shape[-1]))
                layer_counts = torch.stack(rows).double()
                counts = layer_counts if counts is None else counts + layer_counts
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("expert_load needs at least one batch")
    return counts / counts.sum(-1, keepdim=True)


def load_line(shares: torch.Tensor, rows: int) -> str:
    """One line on `expert_load`'s shares: the most and least used expert, and the imbalance (max / mean) by layer."""
    experts = shares.shape[-1]
    top = int(shares.argmax())
    low = int(shares.argmin())
    imbalance = shares.max(-1).values * experts
    return (f"expert load on {rows} training rows (share of routed slots; even: {1 / experts:.3f}): most "
            f"{shares.max():.3f} (layer {top // experts}, expert {top % experts}), least {shares.min():.3f} (layer "
            f"{low // experts}, expert {low % experts}); max/mean by layer {imbalance.min():.2f}-{imbalance.max():.2f}")
