"""Small Triton device helpers shared by the `*_triton` kernel modules (imported lazily, like them)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """Rounds float32 values to the nearest bfloat16 (ties to even), returned as float32.

    A later `.to(tl.bfloat16)` is then exact whatever rounding the cast uses: GPUs round to nearest, but the
    Triton interpreter truncates, so without this bf16 results would differ by one ulp on CPU.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def is_bf16(t: torch.Tensor) -> bool:
    """Host-side flag for the `BF16` constexpr of the kernels."""
    return t.dtype == torch.bfloat16
