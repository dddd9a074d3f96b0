"""NF4 (bitsandbytes 4-bit) weights: layout, reference dequantisation and dispatch.

bitsandbytes stores a `[out, in]` weight flattened row-major and packed two values per byte: element `2i`
in the high nibble of byte `i`, element `2i + 1` in the low nibble. Each run of `blocksize` consecutive
elements shares one scale `absmax[j]`; a value is `code[nibble] * absmax[element // blocksize]` computed in
float32 and then rounded to the storage dtype. With double quantisation (`quant_state.nested`) the scales are
themselves 8-bit: `absmax = state2.code[absmax_q] * state2.absmax[j // state2.blocksize] + offset`, again in
float32 as two separately rounded operations (which is what makes a bit-exact reimplementation possible).

The same formula holds for FP4 (only the 16-entry `code` table differs), so these helpers accept both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.kernels._dispatch import use_triton


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """Tensors of one 4-bit weight, unpacked from a bitsandbytes `QuantState`.

    Attributes:
        packed: Packed nibbles, `uint8`, `ceil(out * in / 2)` elements (any shape, contiguous).
        absmax: Per-block scales: `uint8` codes when nested, else `float32`.
        code: The 16-entry `float32` value table (NF4 or FP4).
        blocksize: Elements per scale block.
        shape: `(out_features, in_features)`.
        dtype: Dtype the weight dequantises to (`quant_state.dtype`).
        nested_absmax: `float32` scales of the scales (double quantisation), else None.
        nested_code: 256-entry `float32` table of the nested 8-bit quantisation, else None.
        nested_blocksize: Block size of the nested quantisation (0 when not nested).
        offset: 1-element `float32` tensor added to the dequantised scales (nested only), else None.
        quant_state: The original `QuantState` (used to call bitsandbytes' own dequantisation on CPU).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 0
    offset: torch.Tensor | None = None
    quant_state: Any = None

    @property
    def device(self) -> torch.device:
        """Device of the packed data."""
        return self.packed.device

    @property
    def nested(self) -> bool:
        """Whether the scales are double-quantised."""
        return self.nested_absmax is not None

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state: Any) -> NF4Weight:
        """Builds the view from a packed weight and its `bitsandbytes.functional.QuantState`.

        Args:
            packed: `Params4bit` data (`uint8`; a `[n, 1]` column in bitsandbytes).
            quant_state: Its `QuantState`.

        Returns:
            The unpacked description.

        Raises:
            ValueError: For layouts this module does not read (CPU-repacked weights, non-2D shapes).
        """
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("weight was repacked by bitsandbytes for AVX512-BF16 CPU inference; not supported")
        if quant_state.shape is None or len(quant_state.shape) != 2:
            raise ValueError(f"expected a 2-D quantised weight, got shape {quant_state.shape}")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        device = packed.device
        nested = getattr(quant_state, "nested", False) and quant_state.state2 is not None
        state2 = quant_state.state2 if nested else None
        offset = None
        if nested:
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
        return cls(
            packed=packed.contiguous(),
            absmax=quant_state.absmax.contiguous(),
            code=quant_state.code.to(device=device, dtype=torch.float32).contiguous(),
            blocksize=int(quant_state.blocksize),
            shape=(int(quant_state.shape[0]), int(quant_state.shape[1])),
            dtype=quant_state.dtype,
            nested_absmax=state2.absmax.float().contiguous() if nested else None,
            nested_code=state2.code.to(device=device, dtype=torch.float32).contiguous() if nested else None,
            nested_blocksize=int(state2.blocksize) if nested else 0,
            offset=offset,
            quant_state=quant_state,
        )


def nf4_weight_of(module: torch.nn.Module) -> NF4Weight | None:
    """Returns the 4-bit weight of a `bitsandbytes.nn.Linear4bit` (or None for anything else).

    Args:
        module: A linear layer.

    Returns:
        The weight view, or None if the module is not a readable 4-bit linear layer.
    """
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "quant_type", None) not in ("nf4", "fp4"):
        return None
    try:
        return NF4Weight.from_quant_state(weight.data, quant_state)
    except ValueError:
        return None


def dequantize_absmax(w: NF4Weight) -> torch.Tensor:
    """Returns the float32 block scales, undoing double quantisation the way bitsandbytes does."""
    if not w.nested:
        return w.absmax.float()
    n = w.absmax.numel()
    block2 = torch.arange(n, device=w.device) // w.nested_blocksize
    scales = w.nested_code[w.absmax.reshape(-1).long()] * w.nested_absmax[block2]
    return scales + w.offset


def dequantize_nf4_reference(w: NF4Weight) -> torch.Tensor:
    """Naive PyTorch dequantisation (the ground truth; allocates int64 index tensors).

    Args:
        w: The 4-bit weight.

    Returns:
        The `[out, in]` weight in `w.dtype`.
    """
    n = w.shape[0] * w.shape[1]
    data = w.packed.reshape(-1)
    nibbles = torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(-1)[:n].long()
    scales = dequantize_absmax(w)[torch.arange(n, device=w.device) // w.blocksize]
    return (w.code[nibbles] * scales).reshape(w.shape).to(w.dtype)


def _dequantize_torch(w: NF4Weight) -> torch.Tensor:
    """CPU/torch path: bitsandbytes' own (C) dequantisation when the QuantState is at hand."""
    if w.quant_state is not None:
        import bitsandbytes.functional as bnbf

        out = bnbf.dequantize_4bit(w.packed, w.quant_state)
        return out.reshape(w.shape)
    return dequantize_nf4_reference(w)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantises a 4-bit weight (Triton kernel on CUDA, bitsandbytes/torch elsewhere).

    Args:
        w: The 4-bit weight.
        dtype: Dtype of the result; defaults to `w.dtype`. Values are rounded to `w.dtype` first, like
            `bnb.matmul_4bit` does.

    Returns:
        A new `[out, in]` tensor.
    """
    if use_triton(w.packed):
        from finetune.kernels import nf4_triton

        out = nf4_triton.dequantize(w)
    else:
        out = _dequantize_torch(w)
    return out if dtype is None or dtype == out.dtype else out.to(dtype)
