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

torch's `varlen_attn` has changed its keywords between releases (`window_size` and `enable_gqa` are recent), so what
it takes is read from the installed function's signature (`varlen_features`), never from a version number; a torch
whose function cannot express causal, grouped-query attention gets the per-sample sdpa, with the reason in the banner.
Every call of these functions is counted by the path that actually ran (`attention_calls`): the stage summary keeps
the counts, so a packed row whose boundaries never arrived (masked sdpa over the whole row) shows there.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from finetune.model import lean_saves

NAME = "ft_sdpa_per_sample"
_calls: Counter[str] = Counter()  # attention calls of this process by the path that ran (attention_calls)


def attention_calls(reset: bool = False) -> dict[str, int]:
    """How many attention calls ran each path since the last reset (`varlen`, `sdpa per sample`, `sdpa with mask
    (...)`, each fallback with its reason); `reset` clears the counts after reading them."""
    counts = dict(_calls)
    if reset:
        _calls.clear()
    return counts


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


_position_cuts: tuple[Any, int, list[int] | None] = (None, -1, None)  # the same, for cuts found in position_ids


def sample_cuts(kwargs: dict[str, Any], length: int) -> list[int] | None:
    """The sample boundaries of a padding-free row of `length` tokens, or None when it holds no packed samples.

    The trainer's collator passes `cu_seq_lens_q` (trl >= 1.16); older ones (trl 1.13) pass only `position_ids`,
    which restart at 0 where a sample starts: then the boundaries are read from them (once per batch), as flash
    attention does. A row whose positions never restart is one sample, left to sdpa with its mask.
    """
    global _position_cuts
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        return host_bounds(bounds)
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or positions.shape[0] != 1 or positions.shape[1] != length:
        return None
    ref, version, cuts = _position_cuts
    if ref is not None and ref() is positions and version == positions._version:
        return cuts
    pos = positions[0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    packed = len(starts) > 1 and starts[0] == 0 and all(b in (a + 1, 0) for a, b in zip(pos, pos[1:], strict=False))
    cuts = [*starts, length] if packed else None
    _position_cuts = (weakref.ref(positions), positions._version, cuts)
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

    path = kwargs.pop("_ft_path", "sdpa per sample")  # varlen_attention's reason for stepping aside
    masked = ("padded batch" if query.shape[0] != 1 else
              "KV cache" if kwargs.get("cache") is not None or query.shape[2] != key.shape[2] else None)
    cuts = sample_cuts(kwargs, query.shape[2]) if masked is None else None
    if masked is not None or cuts is None:
        _calls[f"sdpa with mask ({masked or 'no sample boundaries'})"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _calls[path] += 1
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(cuts[:-1], cuts[1:], strict=True)
        if e > s
    ]
    result = _to_rows(*parts)
    lean_saves.register(result, _to_rows, *parts)  # o_proj's input, recreated from what the kernel keeps
    return result, None


def _to_rows(*parts: torch.Tensor) -> torch.Tensor:
    """Per-sample attention outputs `[1, heads, t, d]` -> the row's `[1, T, heads, d]`, contiguous."""
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).transpose(1, 2).contiguous()


VARLEN = "ft_varlen"  # torch's flash-attention varlen kernel over a whole padding-free row (CUDA, fp16/bf16)
FLASH = "flash_attention_2"  # transformers' own: reads the row's `cu_seq_lens_q` itself
#: The attention implementations that compute a padding-free row sample by sample (what the loss heads check).
PACKED = (NAME, VARLEN, FLASH)


def varlen_features(fn: Any = None) -> dict[str, bool] | None:
    """The optional keywords the installed `varlen_attn` takes (None: this torch has no such function).

    Read from its signature: `window_size` (causal as `(-1, 0)`), `is_causal` (older spelling), `enable_gqa` (key and
    value with fewer heads than the query), `scale`.
    """
    if fn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as fn
        except ImportError:
            return None
    params = inspect.signature(fn).parameters
    return {name: name in params for name in ("window_size", "is_causal", "enable_gqa", "scale")}


def varlen_problem(features: dict[str, bool] | None, gqa: bool) -> str | None:
    """Why torch's varlen kernel cannot compute this model's attention (None: it can)."""
    if features is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if not (features["window_size"] or features["is_causal"]):
        return "varlen_attn takes neither window_size nor is_causal (no causal mask)"
    if gqa and not features["enable_gqa"]:
        return "varlen_attn has no enable_gqa (grouped-query attention)"
    return None


def varlen_kwargs(features: dict[str, bool], scaling: float | None, head_dim: int, gqa: bool) -> dict[str, Any] | None:
    """The keyword arguments of our `varlen_attn` call, for the features of the installed function.

    Returns None when the call cannot express this attention (then the caller runs the per-sample sdpa).
    """
    if varlen_problem(features, gqa) is not None:
        return None
    kw: dict[str, Any] = {"window_size": (-1, 0)} if features["window_size"] else {"is_causal": True}
    if features["scale"]:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-9 * scaling:
        return None  # a scale other than the default cannot be passed
    if gqa:
        kw["enable_gqa"] = True
    return kw


KERNEL_DEVICE = "cuda"  # where varlen_attn runs (the CPU tests point it at "cpu" to record the call we make)
_FEATURES: list = []  # the installed varlen_attn's features, read once per process


def _installed_features() -> dict[str, bool] | None:
    if not _FEATURES:
        _FEATURES.append(varlen_features())
    return _FEATURES[0]


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

    Anything it does not cover (no boundaries, CPU, float32, dropout, a sliding window, a KV cache, keywords the
    installed function lacks) runs :func:`per_sample_sdpa`, so the result is the same everywhere, only the speed
    differs; the counts (:func:`attention_calls`) say which ran and why.
    """
    cuts = None
    if query.shape[0] == 1 and query.shape[2] == key.shape[2] and kwargs.get("cache") is None:
        cuts = sample_cuts(kwargs, query.shape[2])
    if cuts is None:  # sdpa with its mask, counted there
        return per_sample_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    why = ("not CUDA" if query.device.type != KERNEL_DEVICE else
           f"{query.dtype}" if query.dtype not in (torch.float16, torch.bfloat16) else "dropout" if dropout else
           "sliding window" if kwargs.get("sliding_window") is not None else None)
    features = _installed_features() if why is None else None
    call = varlen_kwargs(features, scaling, query.shape[-1], gqa) if why is None and features else None
    if why is None and call is None:
        why = varlen_problem(features, gqa) or "varlen_attn has no scale keyword"
    if why is not None:
        kwargs["_ft_path"] = f"sdpa per sample (not varlen: {why})"
        return per_sample_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    _calls["varlen"] += 1
    bounds = kwargs.get("cu_seq_lens_q")
    longest = int(kwargs.get("max_length_q") or max(b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)))
    cu = (bounds if bounds is not None else torch.tensor(cuts, device=query.device)).to(torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
    return varlen_attn(q, k, v, cu, cu, longest, longest, **call)[None], None


def choose_padding_free_attention(current: str | None, device: str, dtype: torch.dtype, flash_attn: bool,
                                  varlen_missing: str | None) -> tuple[str | None, str]:
    """Which attention computes padding-free rows, and why (the stage banner prints it).

    Args:
        current: The model's attention implementation as loaded (`model.attn_implementation`, else sdpa).
        device: Where the model runs (`cuda`, `cpu`, ...).
        dtype: The model's compute dtype (its embeddings').
        flash_attn: Whether the flash-attn package works here (transformers' `is_flash_attn_2_available`).
        varlen_missing: Why torch's varlen kernel cannot compute this model's attention (:func:`varlen_problem`),
            None where it can.

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
    if device == "cuda" and half and varlen_missing is None:
        return VARLEN, "torch varlen flash attention, one call per row (flash-attn is not installed)"
    why = ("no CUDA" if device != "cuda" else f"{dtype} needs sdpa" if not half else
           f"no varlen kernel here: {varlen_missing}; flash-attn is not installed")
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
    cfg = getattr(lm.config, "get_text_config", lambda: lm.config)()
    heads = getattr(cfg, "num_attention_heads", None)
    gqa = (getattr(cfg, "num_key_value_heads", None) or heads) != heads
    name, why = choose_padding_free_attention(getattr(lm.config, "_attn_implementation", None), weight.device.type,
                                              weight.dtype, is_flash_attn_2_available(),
                                              varlen_problem(_installed_features(), gqa))
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
