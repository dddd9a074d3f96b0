"""Per-sample causal attention for padding-free rows: each sample of a row costs what it would cost alone.

A padding-free micro-batch is one row holding several samples back to back. With `sdpa`, transformers builds a
block-diagonal causal mask over the whole row and the kernel computes every query against every key of the row,
masked or not: attention work grows with the square of the row length instead of the sum of the squares of the
sample lengths (4-5x more for four samples of similar length; the largest single cost of a step after the LM head in
our CPU benchmark). The trainer's padding-free collator also passes the sample boundaries (`cu_seq_lens_q`), which
is what flash attention's varlen kernel reads; this attention function reads them too and runs plain causal sdpa on
each sample's slice. Without boundaries (padded batches, generation) it is transformers' sdpa, mask included.

It is registered with transformers' `AttentionInterface` under its own name and switched on per model instance
(`use_per_sample_attention`), so no other model in the process changes.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

NAME = "ft_sdpa_per_sample"
_host_cuts: tuple[Any, int, list[int]] = (None, -1, [])  # (weakref to the bounds tensor, its version, its values)


def host_bounds(bounds: torch.Tensor) -> list[int]:
    """The sample bounds as Python ints, read from the device once per batch, not once per layer.

    Every layer of a forward (and the recompute of gradient checkpointing) receives the same `cu_seq_lens_q` tensor,
    so its values are kept with a weak reference to it: on a GPU, one device-to-host copy (and sync) per micro-step.
    """
    global _host_cuts
    ref, version, cuts = _host_cuts
    if ref is not None and ref() is bounds and version == bounds._version:
        return cuts
    cuts = bounds.tolist()
    _host_cuts = (weakref.ref(bounds), bounds._version, cuts)
    return cuts


def per_sample_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `[1, heads, T, d]` inputs with `cu_seq_lens_q` -> `[1, T, heads, d]`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cuts = host_bounds(bounds)
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(cuts[:-1], cuts[1:], strict=True)
        if e > s
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_per_sample_attention(model: Any) -> bool:
    """Switch a (peft-wrapped) model that uses `sdpa` to per-sample attention. False (unchanged) for any other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, per_sample_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches and generation keep sdpa's masks
    lm.set_attn_implementation(NAME)
    return True
