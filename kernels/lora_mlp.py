"""LoRA SwiGLU MLP (Llama/Qwen2/Mistral): `down(silu(gate(x)) * up(x))` with a LoRA on each projection.

One autograd op for the whole block. Saved for backward: `x`, the pre-activations `g = gate(x)` and
`u = up(x)` and the three small `[M, r]` LoRA products; `h = silu(g) * u` and `silu(g)` are recomputed
in backward instead of being stored (eager PyTorch keeps `silu(g)` and `h` as well). Base weights are
re-dequantised in backward, never saved.

LoRA dropout must be inactive (p = 0 or eval mode); the patcher composes :func:`lora_linear` ops otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finetune.kernels._dispatch import autocast_dtype, cast_floating, use_triton
from finetune.kernels.lora_linear import LoRAParams, _check_frozen, lora_linear_reference, proj_backward, proj_forward


def swiglu_torch(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`silu(g) * u` in the tensors' dtype (PyTorch path)."""
    return F.silu(g) * u


def swiglu_backward_torch(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `silu(g) * u` (PyTorch path): the ops autograd runs, without extra `[M, I]` buffers.

    `dh` is overwritten (it becomes `dh * u`); callers pass a gradient they no longer need.
    """
    du = F.silu(g).mul_(dh)
    dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
    return dg, du


def _swiglu(g: torch.Tensor, u: torch.Tensor, triton: bool) -> torch.Tensor:
    if triton:
        from finetune.kernels.activations_triton import swiglu_forward

        return swiglu_forward(g, u)
    return swiglu_torch(g, u)


class LoRAMLPFunction(torch.autograd.Function):
    """Autograd op for :func:`lora_mlp`. Tensor arguments after `triton`: (bias, A, B) for gate, up, down."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weights: tuple, scales: tuple, triton: bool, *params: torch.Tensor | None
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        (gb, ga, gB), (ub, ua, uB), (db_, da, dB) = params[0:3], params[3:6], params[6:9]
        g, xa_g = proj_forward(x2, x2, weights[0], gb, ga, gB, scales[0], triton)
        u, xa_u = proj_forward(x2, x2, weights[1], ub, ua, uB, scales[1], triton)
        h = _swiglu(g, u, triton)
        out, xa_d = proj_forward(h, h, weights[2], db_, da, dB, scales[2], triton)
        ctx.weights, ctx.scales, ctx.triton, ctx.shape = weights, scales, triton, shape
        ctx.bias_dtypes = [p.dtype if p is not None else None for p in (gb, ub, db_)]
        ctx.save_for_backward(x2, g, u, xa_g, xa_u, xa_d, ga, gB, ua, uB, da, dB)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, g, u, xa_g, xa_u, xa_d, ga, gB, ua, uB, da, dB = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        w, s, tri = ctx.weights, ctx.scales, ctx.triton
        h = _swiglu(g, u, tri)
        dh, _, d_da, d_dB, d_db = proj_backward(
            dy2, h, xa_d, w[2], da, dB, s[2], tri, (True, need[11], need[12], need[10])
        )
        del h
        if tri:
            from finetune.kernels.activations_triton import swiglu_backward

            dg, du = swiglu_backward(dh, g, u)
        else:
            dg, du = swiglu_backward_torch(dh, g, u)
        del dh
        dx_g, _, g_da, g_dB, g_db = proj_backward(
            dg, x2, xa_g, w[0], ga, gB, s[0], tri, (need[0], need[5], need[6], need[4])
        )
        dx_u, _, u_da, u_dB, u_db = proj_backward(
            du, x2, xa_u, w[1], ua, uB, s[1], tri, (need[0], need[8], need[9], need[7])
        )
        dx = dx_g.add_(dx_u).reshape(ctx.shape) if need[0] else None
        bias_grads = [
            gr.to(dt) if gr is not None else None for gr, dt in zip((g_db, u_db, d_db), ctx.bias_dtypes, strict=True)
        ]
        return (dx, None, None, None, bias_grads[0], g_da, g_dB, bias_grads[1], u_da, u_dB, bias_grads[2], d_da, d_dB)


def lora_mlp(x: torch.Tensor, gate: LoRAParams, up: LoRAParams, down: LoRAParams) -> torch.Tensor:
    """Fused LoRA SwiGLU MLP (no dropout on the LoRA branches).

    Args:
        x: `[..., hidden]` input.
        gate: `gate_proj` parameters (`[inter, hidden]` base weight).
        up: `up_proj` parameters.
        down: `down_proj` parameters (`[hidden, inter]` base weight).

    Returns:
        `[..., hidden]` output.
    """
    for p in (gate, up, down):
        _check_frozen(p.weight)
    dense = gate.weight if isinstance(gate.weight, torch.Tensor) else gate.weight.packed
    triton = use_triton(x, dense, gate.a)
    weights = (gate.weight, up.weight, down.weight)
    scales = (float(gate.scale), float(up.scale), float(down.scale))
    params = (gate.bias, gate.a, gate.b, up.bias, up.a, up.b, down.bias, down.a, down.b)
    dt = autocast_dtype(x.device.type)
    if dt is None:
        return LoRAMLPFunction.apply(x, weights, scales, triton, *params)
    x, params = cast_floating(x, dt), tuple(cast_floating(p, dt) for p in params)
    with torch.autocast(x.device.type, enabled=False):
        return LoRAMLPFunction.apply(x, weights, scales, triton, *params)


def lora_mlp_reference(x: torch.Tensor, gate: LoRAParams, up: LoRAParams, down: LoRAParams) -> torch.Tensor:
    """Naive PyTorch LoRA SwiGLU MLP (what peft + transformers compute)."""
    g = lora_linear_reference(x, gate.weight, gate.a, gate.b, gate.scale, gate.bias)
    u = lora_linear_reference(x, up.weight, up.a, up.b, up.scale, up.bias)
    return lora_linear_reference(F.silu(g) * u, down.weight, down.a, down.b, down.scale, down.bias)
