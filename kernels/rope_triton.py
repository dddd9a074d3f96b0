"""Triton rotary embedding: one program per (batch, position), all heads at once, float32 arithmetic.

Strided inputs are read in place (the `[B, S, H, D] -> [B, H, S, D]` transpose of the projections needs no
copy); the output has the same strides as the input. `BACKWARD` applies the transposed rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from finetune.kernels import launch
from finetune.kernels._dispatch import kernel_interpreted
from finetune.kernels.triton_utils import is_bf16, round_bf16


@triton.jit
def _rope_kernel(
    x_ptr,
    y_ptr,
    cos_ptr,
    sin_ptr,
    S,
    H,
    HALF,
    sxb,
    sxh,
    sxs,
    syb,
    syh,
    sys,
    scb,
    scs,
    ssb,
    sss,
    BACKWARD: tl.constexpr,
    BF16: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    heads = tl.arange(0, BH)
    cols = tl.arange(0, BD)
    cmask = cols < HALF
    mask = (heads[:, None] < H) & cmask[None, :]
    c1 = tl.load(cos_ptr + b * scb + s * scs + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + b * scb + s * scs + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + b * ssb + s * sss + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + b * ssb + s * sss + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    xoff = b * sxb + s * sxs + heads[:, None] * sxh + cols[None, :]
    x1 = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xoff + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    if BF16:
        y1 = round_bf16(y1)
        y2 = round_bf16(y2)
    yoff = b * syb + s * sys + heads[:, None] * syh + cols[None, :]
    tl.store(y_ptr + yoff, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + yoff + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotates `x` `[B, H, S, D]` (last dim contiguous) by `cos`/`sin` `[B or 1, S, D]`."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    bsz, heads, seq, dim = x.shape
    y = torch.empty_like(x)
    if y.stride(-1) != 1:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    half = dim // 2
    bh, bd = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    # one program per position; its [heads, dim / 2] tile gets more warps on large GPUs (launch.row_warps)
    chosen = launch.Launch(launch.row_warps(bh * bd, launch.large_gpu(x, kernel_interpreted(_rope_kernel))))
    launch.run(("rope", bh * bd), chosen, launch.Launch(), lambda c: _rope_kernel[(bsz * seq,)](
        x, y, cos, sin, seq, heads, half, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), BACKWARD=backward, BF16=is_bf16(y), BH=bh, BD=bd,
        **c.options()))
    return y
