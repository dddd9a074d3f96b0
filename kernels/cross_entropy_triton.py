"""Triton row kernels for the chunked cross-entropy: logsumexp + target pick, and the in-place gradient.

Each program owns one row of a float32 `[chunk, V]` logits block and streams it in `BLOCK_V` slices with
an online max/sum, so any vocabulary size works with bounded registers. The slice width and the warps follow the
vocabulary on large GPUs (`launch.cross_entropy_rows`; the interpreter keeps 4096 and 4 warps). The gradient kernel
writes `softmax - onehot` in place, or straight into a bf16/fp16 buffer (no float32 copy and cast for the GEMM).

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
from finetune.kernels.triton_utils import round_bf16


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _lse_nll_kernel(logits_ptr, labels_ptr, lse_ptr, nll_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    m = tl.full((BLOCK_V,), -float("inf"), dtype=tl.float32)
    s = tl.full((BLOCK_V,), 0.0, dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf"))
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # lanes that have seen only padding stay at 0
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    m_row = tl.reduce(m, 0, _max_combine)
    s_row = tl.reduce(s * tl.exp(m - m_row), 0, _add_combine)
    lse = m_row + tl.log(s_row)
    valid = label != ignore_index
    target = tl.load(base + tl.where(valid, label, 0).to(tl.int64))
    tl.store(lse_ptr + row, lse)
    tl.store(nll_ptr + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _nll_grad_kernel(logits_ptr, labels_ptr, lse_ptr, gout_ptr, out_ptr, V, stride, out_stride, ignore_index,
                     OUT_BF16: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    out = out_ptr + row * out_stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    valid = label != ignore_index
    scale = tl.where(valid, tl.load(gout_ptr + row), 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        if OUT_BF16:  # rounded to nearest like torch's cast, also under the interpreter (which truncates)
            g = round_bf16(g)
        tl.store(out + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(logits: torch.Tensor, kernel: object) -> tuple[launch.Launch, launch.Launch]:
    """The launch chosen for these rows, and the default one."""
    v = logits.shape[1]
    large = launch.large_gpu(logits, kernel_interpreted(kernel))
    return launch.cross_entropy_rows(v, large), launch.cross_entropy_rows(v, False)


def lse_and_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logsumexp and NLL of a contiguous float32 `[n, V]` logits block."""
    n, v = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        labels = labels.contiguous()
        chosen, default = _rows(logits, _lse_nll_kernel)
        launch.run(("lse", v), chosen, default, lambda c: _lse_nll_kernel[(n,)](
            logits, labels, lse, nll, v, logits.stride(0), ignore_index, BLOCK_V=c.block, **c.options()))
    return lse, nll


def nll_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_nll: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(softmax - onehot(label)) * grad_nll[row]` (0 rows where ignored) of a float32 `[n, V]` logits block.

    Written over `logits`, or into `out` (`[n, V]`, float32, bfloat16 or float16, rounded to nearest); returns it.
    """
    n, v = logits.shape
    out = logits if out is None else out
    if n:
        labels, lse, grad_nll = labels.contiguous(), lse.contiguous(), grad_nll.contiguous()
        chosen, default = _rows(logits, _nll_grad_kernel)
        launch.run(("grad", v), chosen, default, lambda c: _nll_grad_kernel[(n,)](
            logits, labels, lse, grad_nll, out, v, logits.stride(0), out.stride(0), ignore_index,
            OUT_BF16=out.dtype == torch.bfloat16, BLOCK_V=c.block, **c.options()))
    return out
