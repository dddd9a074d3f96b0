"""RMSNorm, Llama convention: `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` with float32 statistics.

The fused op saves only `x` and the per-row `rstd` (float32, one value per row); eager PyTorch keeps the
float32 upcast of `x` and the normalised float32 activations as well. Backward recomputes the normalised
activations from `x` and `rstd`. The weight gets a gradient only if it requires one (frozen under LoRA).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.kernels._dispatch import use_triton


class RMSNormFunction(torch.autograd.Function):
    """Autograd op for :func:`rms_norm`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, triton: bool) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        if triton:
            from finetune.kernels.rmsnorm_triton import rmsnorm_forward

            y, rstd = rmsnorm_forward(x2, weight, eps, out_dtype)
        else:
            xf = x2.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
            y = weight * (xf * rstd.unsqueeze(1)).to(x.dtype)
        ctx.triton, ctx.shape = triton, shape
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, rstd = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.triton:
            from finetune.kernels.rmsnorm_triton import rmsnorm_backward

            dx, dw = rmsnorm_backward(dy2.contiguous(), x2, weight, rstd, need_w)
        else:
            xf = x2.float()
            normed = xf * rstd.unsqueeze(1)
            dn = dy2.float() * weight.float()
            dx = (rstd.unsqueeze(1) * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x2.dtype)
            dw = (dy2.float() * normed.to(x2.dtype).float()).sum(0) if need_w else None
        dx = dx.reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        return dx, dw.to(weight.dtype) if dw is not None else None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dimension (Llama/Qwen2/Mistral semantics).

    Args:
        x: `[..., N]` input.
        weight: `[N]` scale.
        eps: Variance epsilon.

    Returns:
        Normalised tensor in `promote_types(weight.dtype, x.dtype)`.
    """
    return RMSNormFunction.apply(x, weight, float(eps), use_triton(x, weight))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `LlamaRMSNorm.forward`."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)
