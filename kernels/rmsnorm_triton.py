"""Triton RMSNorm forward/backward, one row per program, float32 statistics; the warps follow the row width on large
GPUs (`launch.row_warps`; 4 under the interpreter).

The weight gradient is reduced in two steps: each program accumulates its rows into a float32 partial row,
and the `[programs, N]` partials are summed by PyTorch.

Kernels here call only Triton builtins (`tl.reduce` with local combine functions instead of `tl.sum`/`tl.max`,
`tl.full` instead of `tl.zeros`): Triton's own `@jit` helpers are compiled for the mode in force when
`triton` was first imported, so avoiding them lets the kernels run under `TRITON_INTERPRET=1` even if another
library imported `triton` earlier in the process (as bitsandbytes, transformers and peft do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from finetune.kernels import launch
from finetune.kernels._dispatch import kernel_interpreted
from finetune.kernels.triton_utils import is_bf16, round_bf16


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 0, _add_combine) / N + eps)
    normed = x * rstd
    if X_BF16:
        normed = round_bf16(normed)
    normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # Llama rounds to the input dtype before the scale
    y = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed
    if Y_BF16:
        y = round_bf16(y)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    M,
    N,
    ROWS: tl.constexpr,
    HAS_DW: tl.constexpr,
    X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        if row < M:
            x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            normed = x * rstd
            dn = dy * w
            dx = rstd * (dn - normed * (tl.reduce(dn * normed, 0, _add_combine) / N))
            if X_BF16:
                dx = round_bf16(dx)
                normed = round_bf16(normed)
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid * N + cols, dw, mask=mask)


def rmsnorm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(y, rstd)` for a contiguous `[M, N]` input."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(n)
        chosen = launch.Launch(launch.row_warps(block, launch.large_gpu(x, kernel_interpreted(_fwd_kernel))))
        launch.run(("rmsnorm", n), chosen, launch.Launch(), lambda c: _fwd_kernel[(m,)](
            x, weight, y, rstd, n, eps, X_BF16=is_bf16(x), Y_BF16=is_bf16(y), BLOCK_N=block, **c.options()))
    return y, rstd


def rmsnorm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns `(dx, dweight or None)`."""
    m, n = x.shape
    dx = torch.empty_like(x)
    rows = max(1, triton.cdiv(m, 256))
    programs = triton.cdiv(m, rows) if m else 0
    dw_partial = torch.empty((max(programs, 1), n), dtype=torch.float32, device=x.device) if need_dw else dx
    if m:
        block = triton.next_power_of_2(n)
        chosen = launch.Launch(launch.row_warps(block, launch.large_gpu(x, kernel_interpreted(_bwd_kernel))))
        launch.run(("rmsnorm-bwd", n), chosen, launch.Launch(), lambda c: _bwd_kernel[(programs,)](
            dy, x, weight, rstd, dx, dw_partial, m, n, ROWS=rows, HAS_DW=need_dw, X_BF16=is_bf16(x), BLOCK_N=block,
            **c.options()))
    dw = dw_partial[:programs].sum(0) if need_dw else None
    return dx, dw
