"""Rotary position embedding, Llama convention (`rotate_half`), on `[B, heads, S, D]` queries and keys.

`y = x * cos + rotate_half(x) * sin` with `cos`/`sin` shaped `[B or 1, S, D]` as produced by
transformers' `LlamaRotaryEmbedding` (`unsqueeze_dim=1`). The two halves of `cos`/`sin` are not assumed
equal. The op saves nothing but `cos`/`sin` (shared by all layers); backward applies the transposed
rotation `dx = dy * cos + rotate_half^T(dy * sin)` with `rotate_half^T(z) = cat(z2, -z1)`, accumulated
in place.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.kernels._dispatch import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`cat(-x2, x1)` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    if backward:  # dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1, accumulated in place
        half = x.shape[-1] // 2
        out = x * c
        out[..., :half].addcmul_(x[..., half:], s[..., half:])
        out[..., half:].addcmul_(x[..., :half], s[..., :half], value=-1)
        return out
    # transformers' formula and rounding, with in-place adds (fewer temporaries, identical results)
    return (x * c).add_(rotate_half(x).mul_(s))


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, triton: bool) -> torch.Tensor:
    if triton:
        from finetune.kernels.rope_triton import rope_apply

        return rope_apply(x, cos, sin, backward)
    return _apply_torch(x, cos, sin, backward)


class RopeFunction(torch.autograd.Function):
    """Autograd op for :func:`apply_rope` (queries and keys in one op)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, triton: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.triton = triton
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos, sin)
        return _apply(q, cos, sin, False, triton), _apply(k, cos, sin, False, triton)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        gq = _apply(dq, cos, sin, True, ctx.triton) if dq is not None and ctx.needs_input_grad[0] else None
        gk = _apply(dk, cos, sin, True, ctx.triton) if dk is not None and ctx.needs_input_grad[1] else None
        return gq, gk, None, None, None


def _check(q: torch.Tensor, cos: torch.Tensor) -> None:
    if q.dim() != 4 or cos.dim() != 3 or cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2:
        raise ValueError(
            f"apply_rope expects q/k [B, H, S, D] (D even) and cos/sin [B, S, D]; got "
            f"{tuple(q.shape)} and {tuple(cos.shape)}"
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rotary embedding of queries and keys (no gradient to `cos`/`sin`).

    Args:
        q: `[B, Hq, S, D]` queries (any strides, e.g. the transposed projection view).
        k: `[B, Hk, S, D]` keys.
        cos: `[B or 1, S, D]` cosines.
        sin: `[B or 1, S, D]` sines.

    Returns:
        `(q_embed, k_embed)`.
    """
    _check(q, cos)
    return RopeFunction.apply(q, k, cos, sin, use_triton(q, k, cos))


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` with `unsqueeze_dim=1`."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
