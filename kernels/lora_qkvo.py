"""LoRA attention projections: fused Q/K/V (one op sharing the input) and O.

:func:`lora_qkv` runs the three projections of the same hidden states as one autograd op: the input is saved
once, the three input gradients are summed inside backward (no autograd accumulation buffers), and each base
weight is re-dequantised in backward rather than kept. :func:`lora_o` is :func:`lora_linear` on the attention
output. LoRA dropout must be inactive for :func:`lora_qkv`; the patcher uses per-projection
:func:`lora_linear` ops (which support dropout) otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.kernels._dispatch import autocast_dtype, cast_floating, use_triton
from finetune.kernels.lora_linear import (
    LoRAParams,
    _check_frozen,
    lora_linear,
    lora_linear_reference,
    proj_backward,
    proj_forward,
)


class LoRASharedInputFunction(torch.autograd.Function):
    """Several LoRA projections of one input. Tensor arguments after `triton`: (bias, A, B) per projection."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weights: tuple, scales: tuple, triton: bool, *params: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        outs, xas = [], []
        for i, weight in enumerate(weights):
            bias, a, b = params[3 * i : 3 * i + 3]
            out, xa = proj_forward(x2, x2, weight, bias, a, b, scales[i], triton)
            outs.append(out.reshape(*shape[:-1], out.shape[-1]))
            xas.append(xa)
        ctx.weights, ctx.scales, ctx.triton, ctx.shape = weights, scales, triton, shape
        ctx.set_materialize_grads(False)  # an unused output gets None: skip its projection in backward
        ctx.bias_dtypes = [params[3 * i].dtype if params[3 * i] is not None else None for i in range(len(weights))]
        ctx.save_for_backward(x2, *xas, *[p for i in range(len(weights)) for p in params[3 * i + 1 : 3 * i + 3]])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *douts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        n = len(ctx.weights)
        saved = ctx.saved_tensors
        x2, xas, ab = saved[0], saved[1 : 1 + n], saved[1 + n :]
        need = ctx.needs_input_grad
        dx = None
        grads: list[torch.Tensor | None] = []
        for i, dout in enumerate(douts):
            a, b = ab[2 * i], ab[2 * i + 1]
            if dout is None:
                grads += [None, None, None]
                continue
            needs = (need[0], need[4 + 3 * i + 1], need[4 + 3 * i + 2], need[4 + 3 * i])
            dy2 = dout.reshape(-1, dout.shape[-1])
            dxi, _, da, db, dbias = proj_backward(
                dy2, x2, xas[i], ctx.weights[i], a, b, ctx.scales[i], ctx.triton, needs
            )
            if dxi is not None:
                dx = dxi if dx is None else dx + dxi
            dbias = dbias.to(ctx.bias_dtypes[i]) if dbias is not None else None
            grads += [dbias, da, db]
        dx = dx.reshape(ctx.shape) if dx is not None and need[0] else None
        return (dx, None, None, None, *grads)


def lora_shared_input(x: torch.Tensor, projs: tuple[LoRAParams, ...]) -> tuple[torch.Tensor, ...]:
    """Runs several LoRA projections of the same input as one op (see :class:`LoRASharedInputFunction`)."""
    for p in projs:
        _check_frozen(p.weight)
    first = projs[0].weight
    triton = use_triton(x, first if isinstance(first, torch.Tensor) else first.packed, projs[0].a)
    params = tuple(t for p in projs for t in (p.bias, p.a, p.b))
    weights, scales = tuple(p.weight for p in projs), tuple(float(p.scale) for p in projs)
    dt = autocast_dtype(x.device.type)
    if dt is None:
        return LoRASharedInputFunction.apply(x, weights, scales, triton, *params)
    x, params = cast_floating(x, dt), tuple(cast_floating(p, dt) for p in params)
    with torch.autocast(x.device.type, enabled=False):
        return LoRASharedInputFunction.apply(x, weights, scales, triton, *params)


def lora_qkv(x: torch.Tensor, q: LoRAParams, k: LoRAParams, v: LoRAParams) -> tuple[torch.Tensor, ...]:
    """Fused LoRA Q/K/V projections of `x`; returns `(q, k, v)` shaped `[..., out_i]`."""
    return lora_shared_input(x, (q, k, v))


def lora_o(x: torch.Tensor, o: LoRAParams) -> torch.Tensor:
    """LoRA output projection (same as :func:`lora_linear`)."""
    return lora_linear(x, o.weight, o.a, o.b, o.scale, o.bias)


def lora_qkv_reference(x: torch.Tensor, q: LoRAParams, k: LoRAParams, v: LoRAParams) -> tuple[torch.Tensor, ...]:
    """Naive PyTorch Q/K/V LoRA projections."""
    return tuple(lora_linear_reference(x, p.weight, p.a, p.b, p.scale, p.bias) for p in (q, k, v))
