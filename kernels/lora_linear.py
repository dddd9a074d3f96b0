"""LoRA linear layer over a frozen (optionally NF4-quantised) base weight, forward and backward.

`y = x @ W.T + bias + scale * (x_lora @ A.T) @ B.T` with peft's shapes (`A = lora_A.weight` is `[r, in]`,
`B = lora_B.weight` is `[out, r]`) and peft's dropout convention (`x_lora = dropout(x)`, the base branch
sees `x`). Gradients flow to `x`, `A`, `B` (and the bias if it is trainable); the base weight is
frozen. The dense weight is never saved for backward: backward dequantises the 4-bit weight again (on CUDA the
Triton kernel even dequantises tile by tile inside the matmul). Saved: `x` (and `x_lora` when dropout made a
distinct tensor) and the small `[M, r]` product `x_lora @ A.T`.

The LoRA branch is computed in `promote_types(x.dtype, A.dtype)` (peft casts the input to the adapter's
dtype), the base branch in `x.dtype` (bitsandbytes' compute dtype follows the input).

Dropout is supported here by passing `x_lora` (the caller applies `nn.Dropout`, whose mask autograd keeps);
the fused MLP/QKV blocks require it to be inactive and the patcher falls back to this op when it is not.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from finetune.kernels._dispatch import autocast_dtype, cast_floating, use_triton
from finetune.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference

BaseWeight = torch.Tensor | NF4Weight

#: On the Triton path, 4-bit matmuls with at most this many rows use the fused dequant-matmul kernel; larger ones
#: dequantise into a transient buffer (Triton kernel) and call cuBLAS, which wins once the matmul is compute-bound.
NF4_FUSED_MAX_ROWS = 64


class LoRAParams(NamedTuple):
    """One LoRA projection: frozen base weight, adapter matrices (peft shapes), scaling and optional bias."""

    weight: BaseWeight
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None


def _lora_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, a.dtype)


def _dense(weight: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype)
    return weight.to(dtype)


def _add_low_rank(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`out + scale * u @ v`, in place (one GEMM, no `[M, N]` temporaries) when the dtypes agree."""
    if u.dtype == out.dtype:
        return out.addmm_(u, v, alpha=scale)
    return out.add_(torch.mm(u, v).mul_(scale).to(out.dtype))


def proj_forward(
    x2: torch.Tensor,
    xl2: torch.Tensor,
    weight: BaseWeight,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA projection on 2-D inputs, without autograd.

    Args:
        x2: `[M, K]` input of the base branch.
        xl2: `[M, K]` input of the LoRA branch (`x2` itself without dropout).
        weight: Frozen `[N, K]` base weight (dense or 4-bit).
        bias: Optional `[N]` bias.
        a: `[r, K]` LoRA A.
        b: `[N, r]` LoRA B.
        scale: LoRA scaling.
        triton: Whether to use the Triton kernels.

    Returns:
        `([M, N] output in x2.dtype, [M, r] x_lora @ A.T in the LoRA dtype)`.
    """
    ld = _lora_dtype(x2, a)
    xa = xl2.to(ld) @ a.to(ld).t()
    bias_c = bias.to(x2.dtype) if bias is not None else None
    if triton and isinstance(weight, NF4Weight) and x2.shape[0] <= NF4_FUSED_MAX_ROWS:
        from finetune.kernels.nf4_triton import nf4_matmul

        return nf4_matmul(x2, weight, True, bias_c, (xa, b.to(ld).t(), scale)), xa
    out = F.linear(x2, _dense(weight, x2.dtype), bias_c)
    return _add_low_rank(out, xa, b.to(ld).t(), scale), xa


def proj_backward(
    dy2: torch.Tensor,
    xl2: torch.Tensor,
    xa: torch.Tensor,
    weight: BaseWeight,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    triton: bool,
    needs: tuple[bool, bool, bool, bool],
    lora_into_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of one LoRA projection.

    Args:
        dy2: `[M, N]` output gradient.
        xl2: `[M, K]` LoRA-branch input.
        xa: `[M, r]` saved `xl2 @ A.T`.
        weight: The frozen base weight (re-dequantised here).
        a: LoRA A.
        b: LoRA B.
        scale: LoRA scaling.
        triton: Whether to use the Triton kernels.
        needs: Whether `(dx, dA, dB, dbias)` are needed.
        lora_into_dx: Add the LoRA-branch input gradient into `dx` (False: return it separately).

    Returns:
        `(dx, dx_lora, dA, dB, dbias)`; `dx_lora` is None when folded into `dx`.
    """
    need_dx, need_da, need_db, need_dbias = needs
    ld = xa.dtype
    dyl = dy2.to(ld)
    dyb = dyl @ b.to(ld)
    da = (dyb.t() @ xl2.to(ld)).mul_(scale).to(a.dtype) if need_da else None
    db = (dyl.t() @ xa).mul_(scale).to(b.dtype) if need_db else None
    dbias = dy2.sum(0) if need_dbias else None
    dx = dx_lora = None
    if need_dx or not lora_into_dx:
        low = (dyb, a.to(ld), scale)
        if triton and isinstance(weight, NF4Weight) and dy2.shape[0] <= NF4_FUSED_MAX_ROWS and lora_into_dx:
            from finetune.kernels.nf4_triton import nf4_matmul

            dx = nf4_matmul(dy2, weight, False, None, low)
        else:
            dx = dy2 @ _dense(weight, dy2.dtype)
            if lora_into_dx:
                dx = _add_low_rank(dx, dyb, low[1], scale)
            else:
                dx_lora = (dyb @ low[1]).mul_(scale).to(dx.dtype)
    return dx, dx_lora, da, db, dbias


class LoRALinearFunction(torch.autograd.Function):
    """Autograd op for :func:`lora_linear` (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        weight: BaseWeight,
        scale: float,
        triton: bool,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        out, xa = proj_forward(x2, xl2, weight, bias, a, b, scale, triton)
        ctx.weight, ctx.scale, ctx.triton, ctx.shape = weight, scale, triton, shape
        ctx.dropout = x_lora is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(xl2, xa, a, b)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, xa, a, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[2])
        dx, dx_lora, da, db, dbias = proj_backward(
            dy2, xl2, xa, ctx.weight, a, b, ctx.scale, ctx.triton, needs, lora_into_dx=not ctx.dropout
        )
        shape = ctx.shape
        dbias = dbias.to(ctx.bias_dtype) if dbias is not None else None
        dx = dx.reshape(shape) if dx is not None and needs[0] else None
        dx_lora = dx_lora.reshape(shape) if dx_lora is not None and ctx.needs_input_grad[1] else None
        return dx, dx_lora, dbias, da, db, None, None, None


def _check_frozen(weight: BaseWeight) -> None:
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False); only A, B train")


def lora_linear(
    x: torch.Tensor,
    weight: BaseWeight,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused LoRA linear: `x @ W.T + bias + scale * x_lora @ A.T @ B.T`.

    Args:
        x: `[..., K]` input.
        weight: Frozen `[N, K]` base weight, dense or :class:`NF4Weight`.
        a: `[r, K]` `lora_A.weight`.
        b: `[N, r]` `lora_B.weight`.
        scale: peft's `scaling[adapter]`.
        bias: Optional base-layer bias (gets a gradient if it requires one).
        x_lora: `dropout(x)` for the LoRA branch; None means no dropout (the branch uses `x`).

    Returns:
        `[..., N]` output in `x.dtype`.
    """
    _check_frozen(weight)
    dense = weight if isinstance(weight, torch.Tensor) else weight.packed
    triton = use_triton(x, dense, a, b)
    dt = autocast_dtype(x.device.type)
    if dt is None:
        return LoRALinearFunction.apply(x, x_lora, bias, a, b, weight, float(scale), triton)
    # Under autocast the matmuls run in the autocast dtype, like peft's modules do; the op itself runs with
    # autocast off so its explicit dtype handling holds in forward and backward alike.
    x, x_lora, bias, a, b = (cast_floating(t, dt) for t in (x, x_lora, bias, a, b))
    with torch.autocast(x.device.type, enabled=False):
        return LoRALinearFunction.apply(x, x_lora, bias, a, b, weight, float(scale), triton)


def lora_linear_reference(
    x: torch.Tensor,
    weight: BaseWeight,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive PyTorch LoRA linear (peft's formula; the dense weight is materialised and kept by autograd)."""
    dense = dequantize_nf4_reference(weight) if isinstance(weight, NF4Weight) else weight
    out = F.linear(x, dense.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    ld = _lora_dtype(x, a)
    xl = (x if x_lora is None else x_lora).to(ld)
    return out + (F.linear(F.linear(xl, a.to(ld)), b.to(ld)) * scale).to(out.dtype)
