"""RMSNorm and rotary embedding: every path against transformers' formulas."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

from finetune.kernels import force_backend
from finetune.kernels.rmsnorm import rms_norm, rms_norm_reference
from finetune.kernels.rope import apply_rope, apply_rope_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 64), (7, 96), (33, 65)])
def test_rmsnorm(assert_close, assert_one_ulp, rows, n, dtype, backend):
    gen = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(2, rows, n, generator=gen) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(2, rows, n, generator=gen).to(dtype)
    with force_backend(backend):
        y = rms_norm(x, weight, 1e-6)
        y.backward(dy)
    with torch.no_grad():
        same_dtype = rms_norm_reference(x, weight, 1e-6)
    xf, wf = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = rms_norm_reference(xf, wf, 1e-6)
    ref.backward(dy.float())
    assert y.dtype == dtype
    if dtype == torch.bfloat16:
        assert_one_ulp(y, same_dtype)
    assert_close(y, same_dtype, dtype, kind="elem", what="y vs same-dtype reference")
    assert_close(x.grad, xf.grad, dtype, kind="elem", what="dx")
    assert_close(weight.grad, wf.grad, dtype, kind="mm", what="dweight")


def test_rmsnorm_frozen_weight_no_grad():
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    rms_norm(x, w, 1e-5).sum().backward()
    assert w.grad is None and x.grad is not None


def _cos_sin(batch: int, seq: int, head_dim: int, dtype: torch.dtype, offset: int = 0):
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(offset, offset + seq).unsqueeze(0).expand(batch, seq)
    return rotary(torch.zeros(1, dtype=dtype), pos)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "seq", "head_dim"), [(1, 4, 2, 1, 16), (2, 3, 1, 7, 32)])
def test_rope(assert_close, assert_one_ulp, batch, heads, kv_heads, seq, head_dim, dtype, backend):
    gen = torch.Generator().manual_seed(seq)
    cos, sin = _cos_sin(batch, seq, head_dim, dtype, offset=5)
    # Projections come as [B, S, H, D] views transposed to [B, H, S, D]: non-contiguous inputs.
    q = torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    dq = torch.randn(q.shape, generator=gen).to(dtype)
    dk = torch.randn(k.shape, generator=gen).to(dtype)
    with force_backend(backend):
        qe, ke = apply_rope(q, k, cos, sin)
        torch.autograd.backward((qe, ke), (dq, dk))
    with torch.no_grad():
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qr, kr = apply_rope_reference(qf, kf, cos.float(), sin.float())
    torch.autograd.backward((qr, kr), (dq.float(), dk.float()))
    if backend == "torch":  # same formula, same dtype: bit-identical to transformers
        assert torch.equal(qe, q_hf) and torch.equal(ke, k_hf)
    elif dtype == torch.bfloat16:  # the kernel computes in float32 and rounds once
        assert_one_ulp(qe, qr.to(dtype))
        assert_one_ulp(ke, kr.to(dtype))
    assert_close(qe, q_hf, dtype, kind="elem", what="q vs transformers")
    assert_close(ke, k_hf, dtype, kind="elem", what="k vs transformers")
    assert_close(q.grad, qf.grad, dtype, kind="elem", what="dq")
    assert_close(k.grad, kf.grad, dtype, kind="elem", what="dk")


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="apply_rope"):
        apply_rope(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4))
