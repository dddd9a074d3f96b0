"""Fused LoRA SwiGLU MLP and Q/K/V blocks against the per-projection reference."""

from __future__ import annotations

import pytest
import torch

import finetune.kernels.lora_linear as ll
from finetune.kernels import force_backend
from finetune.kernels.lora_linear import LoRAParams
from finetune.kernels.lora_mlp import lora_mlp, lora_mlp_reference, swiglu_backward_torch, swiglu_torch
from finetune.kernels.lora_qkvo import lora_o, lora_qkv, lora_qkv_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _proj(
    make_nf4, out_f: int, in_f: int, r: int, dtype: torch.dtype, seed: int, quantized: bool = True, bias: bool = False
) -> LoRAParams:
    gen = torch.Generator().manual_seed(seed)
    if quantized:
        weight = make_nf4((out_f, in_f), dtype, seed=seed)[2]
    else:
        weight = (torch.randn(out_f, in_f, generator=gen) * 0.3).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) * 0.2).to(dtype).requires_grad_()
    bias_t = torch.randn(out_f, generator=gen).to(dtype).requires_grad_() if bias else None
    return LoRAParams(weight, a, b, 1.5, bias_t)


def _float_copy(p: LoRAParams) -> LoRAParams:
    clone = lambda t: t.detach().float().requires_grad_() if t is not None else None  # noqa: E731
    return LoRAParams(p.weight, clone(p.a), clone(p.b), p.scale, clone(p.bias))


def _trainables(projs: list[LoRAParams]) -> list[torch.Tensor]:
    return [t for p in projs for t in (p.a, p.b, p.bias) if t is not None]


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "hidden", "inter", "r"), [(1, 64, 96, 4), (7, 96, 64, 8), (33, 64, 96, 8)])
def test_lora_mlp(make_nf4, assert_close, monkeypatch, m, hidden, inter, r, dtype, backend):
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_ROWS", 10**9 if m < 16 else 0)  # both Triton matmul strategies
    projs = [
        _proj(make_nf4, inter, hidden, r, dtype, 1),
        _proj(make_nf4, inter, hidden, r, dtype, 2),
        _proj(make_nf4, hidden, inter, r, dtype, 3),
    ]
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, hidden, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(m, hidden, generator=gen).to(dtype)
    with force_backend(backend):
        out = lora_mlp(x, *projs)
        out.backward(dy)
    refs = [_float_copy(p) for p in projs]
    x_ref = x.detach().float().requires_grad_()
    ref = lora_mlp_reference(x_ref, *refs)
    ref.backward(dy.float())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="out")
    assert_close(x.grad, x_ref.grad, dtype, what="dx")
    for i, (got, exp) in enumerate(zip(_trainables(projs), _trainables(refs), strict=True)):
        assert_close(got.grad, exp.grad, dtype, what=f"param {i}")


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "hidden", "kv", "r"), [(1, 64, 32, 4), (33, 96, 48, 8)])
def test_lora_qkv_and_o(make_nf4, assert_close, m, hidden, kv, r, dtype, backend):
    projs = [
        _proj(make_nf4, hidden, hidden, r, dtype, 4, bias=True),
        _proj(make_nf4, kv, hidden, r, dtype, 5),
        _proj(make_nf4, kv, hidden, r, dtype, 6, quantized=False, bias=True),
    ]
    o = _proj(make_nf4, hidden, hidden, r, dtype, 7)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, hidden, generator=gen).to(dtype).requires_grad_()
    with force_backend(backend):
        q, k, v = lora_qkv(x, *projs)
        out = lora_o(q, o)
        (out.float().square().mean() + k.float().sum() * 0.1 + v.float().pow(3).mean()).backward()
    refs = [_float_copy(p) for p in projs]
    o_ref = _float_copy(o)
    x_ref = x.detach().float().requires_grad_()
    q_r, k_r, v_r = lora_qkv_reference(x_ref, *refs)
    out_r = lora_o(q_r, o_ref)
    (out_r.square().mean() + k_r.sum() * 0.1 + v_r.pow(3).mean()).backward()
    for got, exp, name in [(q, q_r, "q"), (k, k_r, "k"), (v, v_r, "v"), (out, out_r, "o"), (x.grad, x_ref.grad, "dx")]:
        assert_close(got, exp, dtype, what=name)
    for i, (got, exp) in enumerate(zip(_trainables(projs + [o]), _trainables(refs + [o_ref]), strict=True)):
        assert_close(got.grad, exp.grad, dtype, what=f"param {i}")


def test_qkv_with_unused_output(make_nf4, assert_close):
    """A projection whose output gets no gradient (None in backward) is handled."""
    projs = [_proj(make_nf4, 64, 64, 4, torch.float32, s) for s in (1, 2, 3)]
    x = torch.randn(5, 64, requires_grad=True)
    q, _, _ = lora_qkv(x, *projs)
    q.sum().backward()
    assert projs[1].a.grad is None and x.grad is not None


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_kernels(assert_close, assert_one_ulp, dtype):
    from finetune.kernels.activations_triton import swiglu_backward, swiglu_forward

    gen = torch.Generator().manual_seed(0)
    g, u, dh = (torch.randn(7, 65, generator=gen).to(dtype) for _ in range(3))
    h = swiglu_forward(g, u)
    if dtype == torch.bfloat16:
        assert_one_ulp(h, swiglu_torch(g, u))
    assert_close(h, swiglu_torch(g.float(), u.float()), dtype, kind="elem", what="h")
    gf, uf = g.float().requires_grad_(), u.float().requires_grad_()
    swiglu_torch(gf, uf).backward(dh.float())
    for got, exp, name in zip(swiglu_backward(dh, g, u), (gf.grad, uf.grad), ("dg", "du"), strict=True):
        assert_close(got, exp, dtype, kind="elem", what=name)
    for got, exp in zip(swiglu_backward_torch(dh.clone(), g, u), (gf.grad, uf.grad), strict=True):
        assert_close(got, exp, dtype, kind="elem", what="torch path")


def test_mlp_saves_less_than_eager(make_nf4, measure_saved):
    """Saved for backward: x, g, u and [M, r] products; eager also keeps silu(g), h and the dense weights."""
    projs = [_proj(make_nf4, 256, 128, 8, torch.float32, s) for s in (1, 2)] + [
        _proj(make_nf4, 128, 256, 8, torch.float32, 3)
    ]
    x = torch.randn(64, 128, requires_grad=True)
    fused = measure_saved(lambda: lora_mlp(x, *projs))
    eager = measure_saved(lambda: lora_mlp_reference(x, *projs))
    assert fused < eager / 2
