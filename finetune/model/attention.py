"""Per-sample causal attention for padding-free rows: each sample of a row costs what it would cost alone.

A padding-free micro-batch is one row holding several samples back to back. With `sdpa`, transformers builds a
block-diagonal causal mask over the whole row and the kernel computes every query against every key of the row,
masked or not: attention work grows with the square of the row length instead of the sum of the squares of the
sample lengths (4-5x more for four samples of similar length; the largest single cost of a step after the LM head in
our CPU benchmark). The trainer's padding-free collator also passes the sample boundaries (`cu_seq_lens_q`), which
is what flash attention's varlen kernel reads; this attention function reads them too and runs plain causal sdpa on
each sample's slice. Without boundaries (padded batches, generation) it is transformers' sdpa, mask included.

That loop suits the CPU; on a GPU one kernel over the whole row is faster. `use_padding_free_attention` picks per
model (`choose_padding_free_attention`): on CUDA in fp16/bf16, transformers' `flash_attention_2` when flash-attn is
installed (it reads the same boundaries), else `varlen_attention` (one call of PyTorch's flash-attention varlen
kernel per row); elsewhere the per-sample sdpa. Ours are registered with transformers' `AttentionInterface` under
their own names and switched on per model instance, so no other model in the process changes.
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


VARLEN = "ft_varlen"  # torch's flash-attention varlen kernel over a whole padding-free row (CUDA, fp16/bf16)
FLASH = "flash_attention_2"  # transformers' own: reads the row's `cu_seq_lens_q` itself
#: The attention implementations that compute a padding-free row sample by sample (what the loss heads check).
PACKED = (NAME, VARLEN, FLASH)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One `torch.nn.attention.varlen.varlen_attn` call for a padding-free row (causal within each sample).

    Anything it does not cover (no boundaries, CPU, float32, dropout, a sliding window, a KV cache) runs
    :func:`per_sample_sdpa`, so the result is the same everywhere, only the speed differs.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window")
    if (bounds is None or query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16)
            or dropout or window is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or kwargs.get("cache") is not None):
        return per_sample_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    cuts = host_bounds(bounds)
    longest = int(kwargs.get("max_length_q") or max(b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)))
    cu = bounds.to(torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                      enable_gqa=query.shape[1] != key.shape[1])
    return out[None], None


def choose_padding_free_attention(current: str | None, device: str, dtype: torch.dtype, flash_attn: bool,
                                  torch_varlen: bool) -> tuple[str | None, str]:
    """Which attention computes padding-free rows, and why (the stage banner prints it).

    Args:
        current: The model's attention implementation as loaded (`model.attn_implementation`, else sdpa).
        device: Where the model runs (`cuda`, `cpu`, ...).
        dtype: The model's compute dtype (its embeddings').
        flash_attn: Whether the flash-attn package works here (transformers' `is_flash_attn_2_available`).
        torch_varlen: Whether this torch has `torch.nn.attention.varlen.varlen_attn`.

    Returns:
        The implementation to switch to (None: leave the model as it is, no padding-free attention) and the reason.
    """
    if current == FLASH:
        return FLASH, "flash_attention_2 as loaded (transformers reads the sample boundaries)"
    if current != "sdpa":
        return None, f"{current} attention as loaded has no padding-free path"
    half = dtype in (torch.float16, torch.bfloat16)
    if device == "cuda" and half and flash_attn:
        return FLASH, "flash_attention_2 varlen (flash-attn is installed)"
    if device == "cuda" and half and torch_varlen:
        return VARLEN, "torch varlen flash attention, one call per row (flash-attn is not installed)"
    why = "no CUDA" if device != "cuda" else (f"{dtype} needs sdpa" if not half else "no varlen kernel here")
    return NAME, f"sdpa per sample ({why})"


def use_padding_free_attention(model: Any) -> str | None:
    """Switch a (peft-wrapped) model to the attention :func:`choose_padding_free_attention` picks for it.

    Returns:
        What it uses, in words, or None when the model keeps its attention and has no padding-free path.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.utils import is_flash_attn_2_available

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = lm.get_input_embeddings().weight
    try:
        import torch.nn.attention.varlen  # noqa: F401

        torch_varlen = True
    except ImportError:
        torch_varlen = False
    name, why = choose_padding_free_attention(getattr(lm.config, "_attn_implementation", None), weight.device.type,
                                              weight.dtype, is_flash_attn_2_available(), torch_varlen)
    if name is None:
        return None
    if name in (NAME, VARLEN):
        AttentionInterface.register(name, per_sample_sdpa if name == NAME else varlen_attention)
        AttentionMaskInterface.register(name, sdpa_mask)  # padded batches and generation keep sdpa's masks
    if lm.config._attn_implementation != name:
        lm.set_attn_implementation(name)
    return why


def use_per_sample_attention(model: Any) -> bool:
    """Switch a model that uses `sdpa` to padding-free attention (see :func:`use_padding_free_attention`)."""
    return use_padding_free_attention(model) is not None
