"""Chunked (fused linear) cross-entropy and per-token log-probabilities over an LM head.

`nll[t] = logsumexp(h[t] @ W.T + b) - (h[t] @ W.T + b)[label[t]]` (0 where `label == ignore_index`) is
computed `chunk_size` tokens at a time, so only a `[chunk, vocab]` float32 logits block exists at once
instead of the full `[tokens, vocab]` logits (plus their float32 copy, softmax and gradient in eager
PyTorch). With a trainable head, forward keeps only the per-token `logsumexp`; backward recomputes each chunk's
logits, turns them into `softmax - onehot` scaled by the incoming per-token gradient, and accumulates `dh`,
`dW` and `db` chunk by chunk (one extra `[chunk, H] x [H, V]` matmul per chunk). With a frozen head (LoRA),
the gradient of each token's loss with respect to its hidden state, `softmax @ W - W[label]`, is formed in the
forward while the chunk's softmax exists and kept (`[T, H]`, the size of the hidden states); backward only scales
it by the incoming per-token gradient: no recomputed logits.

Logits are computed in the hidden states' dtype and upcast to float32, like transformers' `ForCausalLMLoss`.
Labels must already be shifted by the caller (`hidden[:, :-1]` predicts `labels[:, 1:]`).
On CUDA the row-wise parts (logsumexp/target pick and the in-place gradient) are Triton kernels; the matmuls
stay on cuBLAS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from finetune.kernels._dispatch import autocast_dtype, cast_floating, use_triton

IGNORE_INDEX = -100


#: Chunks hold at least this many bytes of float32 logits (so small hidden sizes still get efficient GEMMs).
MIN_CHUNK_BYTES = 32 * 2**20


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a chunk's float32 logits about the size of the hidden states (Liger's rule), but at
    least :data:`MIN_CHUNK_BYTES` of logits, and never more than the tokens there are."""
    ratio = max(1, math.ceil(vocab / max(hidden, 1)))
    liger = 2 ** math.ceil(math.log2(max(1, math.ceil(n_tokens / ratio))))
    budget = MIN_CHUNK_BYTES // (4 * max(vocab, 1))
    return max(1, min(n_tokens, max(liger, budget)))


def _grad_buffer(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Where the Triton gradient kernel writes a chunk's gradient: a new bf16/fp16 buffer for a half-precision GEMM,
    None (over the float32 logits) otherwise."""
    return torch.empty(logits.shape, dtype=dtype, device=logits.device) if dtype != torch.float32 else None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()


class ChunkedNLLFunction(torch.autograd.Function):
    """Per-token negative log-likelihood over an LM head, chunked along tokens (see module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        triton: bool,
        stats: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # per-token metrics for logs (entropy, mean logit, label is the argmax), not differentiated: `[n, 3]` or empty
        row_stats = torch.empty((n if stats else 0, 3), dtype=torch.float32, device=hidden.device)
        # Frozen head (the LoRA case): d nll[t] / d h[t] = softmax[t] @ W - W[label[t]] needs nothing from the
        # backward but the per-token scale, so it is formed here while the chunk's softmax exists, and the backward
        # neither recomputes the logits nor touches a [chunk, V] buffer.
        # On CUDA too: there the Triton kernel writes the chunk's `softmax - onehot` in place, so the head costs
        # two GEMMs per chunk (logits, gradient) instead of three (logits; logits again and gradient in backward).
        unit_grad = hidden.requires_grad and not weight.requires_grad and (bias is None or not bias.requires_grad)
        dh_unit = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if unit_grad else None
        for start in range(0, n, chunk_size):
            sl = slice(start, min(n, start + chunk_size))
            logits = _chunk_logits(hidden[sl], weight, bias)
            if stats:
                row_stats[sl, 1] = logits.mean(1)
                row_stats[sl, 2] = (logits.argmax(1) == labels[sl]).float()
            if triton:
                from finetune.kernels.cross_entropy_triton import lse_and_nll, nll_grad_

                lse[sl], nll[sl] = lse_and_nll(logits, labels[sl], ignore_index)
                if stats:  # entropy = lse - sum(softmax * logits), before the gradient overwrites the logits
                    probs = (logits - lse[sl].unsqueeze(1)).exp_()
                    row_stats[sl, 0] = lse[sl] - (probs.unsqueeze(1) @ logits.unsqueeze(2)).view(-1)
                    del probs
                if unit_grad:  # softmax - onehot (0 on ignored rows) written in the GEMM's dtype, then one GEMM
                    g = nll_grad_(logits, labels[sl], lse[sl], torch.ones_like(lse[sl]), ignore_index,
                                  out=_grad_buffer(logits, hidden.dtype))
                    dh_unit[sl] = (g @ weight).float()
                    del g
            else:
                valid = labels[sl] != ignore_index
                label = labels[sl].clamp(min=0)
                target = logits.gather(1, label.unsqueeze(1)).squeeze(1)
                row_max = logits.amax(dim=1, keepdim=True)
                # logsumexp in place: no second [chunk, V] buffer
                sum_exp = logits.sub_(row_max).exp_().sum(dim=1)
                lse[sl] = row_max.squeeze(1) + sum_exp.log()
                if stats:  # with e = exp(x - max), s = sum(e): entropy = log(s) - sum(e log e) / s
                    row_stats[sl, 0] = sum_exp.log() - torch.special.xlogy(logits, logits).sum(1) / sum_exp
                nll[sl] = torch.where(valid, lse[sl] - target, 0.0)
                if unit_grad:
                    probs = logits.div_(sum_exp.unsqueeze(1)).to(hidden.dtype)
                    unit = (probs @ weight).float().sub_(weight[label].float())
                    dh_unit[sl] = unit.mul_(valid.unsqueeze(1))
                    del probs
            del logits
        ctx.chunk_size, ctx.ignore_index, ctx.triton = chunk_size, ignore_index, triton
        ctx.unit_grad, ctx.hidden_dtype = unit_grad, hidden.dtype
        if unit_grad:
            ctx.save_for_backward(dh_unit)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.mark_non_differentiable(row_stats)
        return nll, row_stats

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _grad_stats: Any = None) -> tuple[torch.Tensor | None, ...]:
        if ctx.unit_grad:
            (dh_unit,) = ctx.saved_tensors
            dh = (dh_unit * grad_nll.float().unsqueeze(1)).to(ctx.hidden_dtype)
            return dh, None, None, None, None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n = hidden.shape[0]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad_nll = grad_nll.float()
        for start in range(0, n, ctx.chunk_size):
            sl = slice(start, min(n, start + ctx.chunk_size))
            logits = _chunk_logits(hidden[sl], weight, bias)
            if ctx.triton:
                from finetune.kernels.cross_entropy_triton import nll_grad_

                # the bias needs the float32 gradient's column sums; else it is written in hidden's dtype directly
                out = None if need_b else _grad_buffer(logits, hidden.dtype)
                grad = nll_grad_(logits, labels[sl], lse[sl], grad_nll[sl], ctx.ignore_index, out=out)
            else:
                valid = labels[sl] != ctx.ignore_index
                scale = torch.where(valid, grad_nll[sl], 0.0).unsqueeze(1)
                grad = logits.sub_(lse[sl].unsqueeze(1)).exp_()
                grad.scatter_add_(1, labels[sl].clamp(min=0).unsqueeze(1), -torch.ones_like(scale))
                grad.mul_(scale)
            if need_b:
                db += grad.sum(0)
            g = grad.to(hidden.dtype)
            del grad, logits
            if need_h:
                dh[sl] = g @ weight
            if need_w:
                dw.addmm_(g.t().float(), hidden[sl].float())
            del g  # before the next chunk's logits exist: one [chunk, V] buffer at a time
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token negative log-likelihood, chunked.

    Args:
        hidden: `[..., H]` hidden states (already aligned with `labels`).
        weight: `[V, H]` LM-head weight.
        labels: `[...]` target ids; `ignore_index` entries give 0.
        bias: Optional `[V]` LM-head bias.
        chunk_size: Tokens per chunk (default: :func:`default_chunk_size`).
        ignore_index: Label value to ignore.

    Returns:
        float32 `[...]` per-token NLL.
    """
    return _apply(hidden, weight, labels, bias, chunk_size, ignore_index, stats=False)[0]


def token_nll_and_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_nll` and, from the same chunked pass, each token's metrics for logs (not differentiable).

    Returns:
        float32 `[...]` tensors: the NLL, the entropy of the predicted distribution, the mean logit, and 1.0 where
        the label is the (first) argmax, else 0.0.
    """
    nll, row_stats = _apply(hidden, weight, labels, bias, chunk_size, ignore_index, stats=True)
    return nll, *(row_stats[..., i] for i in range(3))


def _apply(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
           chunk_size: int | None, ignore_index: int, stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1).to(h2.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(h2.shape[0], h2.shape[1], weight.shape[0])
    triton = use_triton(h2, weight)
    dt = autocast_dtype(h2.device.type)
    if dt is None:
        nll, row_stats = ChunkedNLLFunction.apply(h2, weight, bias, lab, int(chunk_size), ignore_index, triton, stats)
    else:  # the LM head runs in the autocast dtype, as in the model's own forward
        h2, weight, bias = cast_floating(h2, dt), cast_floating(weight, dt), cast_floating(bias, dt)
        with torch.autocast(h2.device.type, enabled=False):
            nll, row_stats = ChunkedNLLFunction.apply(h2, weight, bias, lab, int(chunk_size), ignore_index, triton,
                                                      stats)
    return nll.reshape(shape), row_stats.reshape(*shape, 3) if stats else row_stats


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Fused LM-head + cross-entropy: mean over non-ignored tokens (or sum / `num_items_in_batch`).

    Matches transformers' `ForCausalLMLoss` given pre-shifted labels, without materialising the logits.
    """
    nll = token_nll(hidden, weight, labels, bias, chunk_size, ignore_index)
    if num_items_in_batch is None:
        denom = (labels != ignore_index).sum()
        return nll.sum() / denom.to(nll.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(nll.device)
    return nll.sum() / num_items_in_batch


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """`log p(label)` per token (0 at ignored positions), float32, without the full logits."""
    return -token_nll(hidden, weight, labels, bias, chunk_size, ignore_index)


def cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Unfused: full logits, upcast to float32, `F.cross_entropy` (transformers' causal LM loss)."""
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, lab, ignore_index=ignore_index)
    return F.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Unfused per-token log-probs: full `log_softmax` then gather (0 at ignored positions)."""
    logp = torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)
