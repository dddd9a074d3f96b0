"""Chunked fused-linear cross-entropy and per-token log-probs against full-logits PyTorch."""

from __future__ import annotations

import pytest
import torch

from finetune.kernels import force_backend
from finetune.kernels.cross_entropy import (
    chunked_cross_entropy,
    cross_entropy_reference,
    default_chunk_size,
    token_logprobs,
    token_logprobs_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(1, 64, 96, 1), (7, 96, 64, 3), (33, 64, 131, 8)]  # (tokens, hidden, vocab, chunk)


def _inputs(t: int, h: int, v: int, dtype: torch.dtype, ignore_every: int = 3, bias: bool = False):
    gen = torch.Generator().manual_seed(t * 7 + v)
    hidden = torch.randn(t, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=gen)
    labels[::ignore_every] = -100
    if t == 1:
        labels[0] = 5
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, b


def _float_leaves(*ts):
    return [t.detach().float().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "h", "v", "chunk"), CASES)
def test_chunked_ce_matches_reference(assert_close, t, h, v, chunk, dtype, backend):
    hidden, weight, labels, bias = _inputs(t, h, v, dtype, bias=t == 7)
    with force_backend(backend):
        loss = chunked_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk)
        loss.backward()
    hf, wf, bf = _float_leaves(hidden, weight, bias)
    ref = cross_entropy_reference(hf, wf, labels, bf)
    ref.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, dtype, what="loss")
    assert_close(hidden.grad, hf.grad, dtype, what="dh")
    assert_close(weight.grad, wf.grad, dtype, what="dW")
    if bias is not None:
        assert_close(bias.grad, bf.grad, dtype, what="db")


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_and_sequence_logprobs(assert_close, backend):
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 64, generator=gen).requires_grad_()
    weight = (torch.randn(97, 64, generator=gen) * 0.2).requires_grad_()
    labels = torch.randint(0, 97, (3, 11), generator=gen)
    labels[:, :4] = -100
    upstream = torch.randn(3, generator=gen)
    with force_backend(backend):
        per_token = token_logprobs(hidden, weight, labels, chunk_size=5)
        seq = per_token.sum(-1)  # a sequence's log-prob, as DPO sums them
        (seq * upstream).sum().backward()
    hf, wf = _float_leaves(hidden, weight)
    ref_tok = token_logprobs_reference(hf, wf, labels)
    (ref_tok.sum(-1) * upstream).sum().backward()
    assert_close(per_token, ref_tok, dtype, what="token logps")
    assert (per_token[:, :4] == 0).all()
    assert_close(seq, ref_tok.sum(-1), dtype, what="sequence logps")
    assert_close(hidden.grad, hf.grad, dtype, what="dh")
    assert_close(weight.grad, wf.grad, dtype, what="dW")


def test_num_items_in_batch_and_all_ignored(assert_close):
    hidden, weight, labels, _ = _inputs(9, 64, 50, torch.float32)
    loss = chunked_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(20), chunk_size=4)
    ref = cross_entropy_reference(hidden, weight, labels, num_items_in_batch=torch.tensor(20))
    assert_close(loss, ref, torch.float32, what="sum / num_items")
    ignored = torch.full_like(labels, -100)
    zero = chunked_cross_entropy(hidden, weight, ignored, num_items_in_batch=1)
    zero.backward()
    assert zero.item() == 0.0 and (hidden.grad == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "h", "v", "chunk"), CASES)
def test_frozen_head_gradient_formed_in_forward_matches_reference(assert_close, measure_saved, t, h, v, chunk, dtype,
                                                                  backend):
    """Frozen head (LoRA): d loss / d hidden is formed in the forward, scaled in the backward; same as full logits,
    for a non-uniform per-token gradient too (token log-probs weighted differently per token, as DPO's are). On the
    Triton backend too (CUDA): there the head must not fall back to recomputing the logits in backward."""
    hidden, weight, labels, bias = _inputs(t, h, v, dtype, bias=t == 7)
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    per_token = torch.linspace(0.5, 2.0, t)
    with force_backend(backend):
        lp = token_logprobs(hidden, weight, labels, bias, chunk_size=chunk)
        (lp.float() * per_token).sum().backward()
    hf = hidden.detach().float().requires_grad_()
    ref = token_logprobs_reference(hf, weight.float(), labels, None if bias is None else bias.float())
    (ref * per_token).sum().backward()
    assert_close(lp, ref, dtype, what="log-probs")
    assert_close(hidden.grad, hf.grad, dtype, what="dh")
    # what the backward keeps is the [T, H] float32 gradient, not the hidden states, weight and labels
    with force_backend(backend):
        saved = measure_saved(lambda: chunked_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk))
    assert saved <= t * h * 4 + 1024


def test_frozen_head_gets_no_gradient():
    hidden, weight, labels, _ = _inputs(7, 64, 50, torch.float32)
    weight.requires_grad_(False)
    chunked_cross_entropy(hidden, weight, labels, chunk_size=2).backward()
    assert weight.grad is None and hidden.grad is not None


def test_logits_are_never_saved(measure_saved):
    """Saved for backward: hidden, weight, labels and one float per token; eager saves [T, V] logits."""
    t, h, v = 256, 32, 4096
    hidden, weight, labels, _ = _inputs(t, h, v, torch.float32)
    fused = measure_saved(lambda: chunked_cross_entropy(hidden, weight, labels))
    eager = measure_saved(lambda: cross_entropy_reference(hidden, weight, labels))
    assert eager >= t * v * 4
    assert fused < (t * h + v * h) * 4 + t * 16 + 4096


def test_default_chunk_size():
    assert default_chunk_size(4096, 4096, 32000) == 512  # [512, 32000] fp32 logits per chunk (Liger's rule)
    assert default_chunk_size(1024, 256, 32768) == 256  # small hidden: the 32 MiB floor decides
    assert default_chunk_size(3, 64, 128) == 3
    assert default_chunk_size(1, 8, 10**6) == 1


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen_head", [True, False])
def test_token_stats_match_trls_fused_head(backend, frozen_head):
    """The per-token metrics DPO logs (entropy, mean logit, top-1) from our chunked pass equal trl's kernel's, and the
    log-probs' gradient is unchanged by asking for them."""
    from trl.kernels import ChunkedLogProbFunction

    from finetune.kernels.cross_entropy import token_nll_and_stats

    hidden, weight, labels, _ = _inputs(33, 64, 131, torch.float32, ignore_every=1000)
    weight.requires_grad_(not frozen_head)
    labels[:4] = torch.nn.functional.linear(hidden[:4], weight).argmax(-1)  # some tokens whose label is the top-1
    with force_backend(backend):
        nll, entropy, mean_logit, top1 = token_nll_and_stats(hidden, weight, labels, chunk_size=8)
        nll.sum().backward()
    ref_h = hidden.detach().clone().requires_grad_()
    logp, ref_entropy, _, ref_mean, ref_top1 = ChunkedLogProbFunction.apply(
        ref_h, weight.detach(), None, labels, 1.0, 64, None, 1.0, ("log_probs", "entropy", "mean_logits", "is_top1"))
    (-logp).sum().backward()
    torch.testing.assert_close(nll, -logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_logit, ref_mean, atol=1e-6, rtol=1e-5)
    assert torch.equal(top1.bool(), ref_top1) and top1[:4].all()
    torch.testing.assert_close(hidden.grad, ref_h.grad, atol=1e-5, rtol=1e-4)
    assert not entropy.requires_grad
