"""Triton kernels for SwiGLU (`silu(g) * u`) and its backward, computed in float32.

The forward rounds `silu(g)` to the storage dtype before multiplying by `u`, like PyTorch's
`act_fn(gate) * up` on half-precision tensors. The backward recomputes `silu` from `g` rather than
reading a saved activation. Blocks of 1024 values (4 warps); 4096 (8 warps) on large GPUs for a million values or
more (`launch.elementwise`).

Kernels here call only Triton builtins (`tl.reduce` with local combine functions instead of `tl.sum`/`tl.max`,
an explicit sigmoid): Triton's own `@jit` helpers are compiled for the mode in force when `triton` was first
imported, so avoiding them lets the kernels run under `TRITON_INTERPRET=1` even if another library imported
`triton` earlier in the process (as bitsandbytes, transformers and peft do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from finetune.kernels import launch
from finetune.kernels._dispatch import kernel_interpreted
from finetune.kernels.triton_utils import is_bf16, round_bf16


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = g * (1.0 / (1.0 + tl.exp(-g)))
    if BF16:
        silu = round_bf16(silu)
    silu = silu.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = silu * u
    if BF16:
        h = round_bf16(h)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    if BF16:
        du = round_bf16(du)
        dg = round_bf16(dg)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Returns `silu(g) * u` (contiguous inputs of equal shape and dtype)."""
    h = torch.empty_like(g)
    n = g.numel()
    chosen = launch.elementwise(n, launch.large_gpu(g, kernel_interpreted(_swiglu_fwd_kernel)))
    launch.run(("swiglu", chosen), chosen, launch.elementwise(n, False), lambda c: _swiglu_fwd_kernel[
        (triton.cdiv(n, c.block),)](g, u, h, n, BF16=is_bf16(h), BLOCK=c.block, **c.options()))
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(dL/dg, dL/du)` given `dL/dh` for `h = silu(g) * u`."""
    dg = torch.empty_like(g)
    du = torch.empty_like(u)
    n = g.numel()
    dh = dh.contiguous()
    chosen = launch.elementwise(n, launch.large_gpu(g, kernel_interpreted(_swiglu_bwd_kernel)))
    launch.run(("swiglu-bwd", chosen), chosen, launch.elementwise(n, False), lambda c: _swiglu_bwd_kernel[
        (triton.cdiv(n, c.block),)](dh, g, u, dg, du, n, BF16=is_bf16(g), BLOCK=c.block, **c.options()))
    return dg, du
