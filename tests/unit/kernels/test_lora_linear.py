"""LoRA linear (NF4 or dense base): forward and A/B/x/bias gradients of every path against the reference."""

from __future__ import annotations

import pytest
import torch

import finetune.kernels.lora_linear as ll
from finetune.kernels import force_backend
from finetune.kernels.lora_linear import lora_linear, lora_linear_reference

CASES = [(1, (64, 96), 4), (7, (96, 64), 8), (33, (33, 65), 8)]  # (M, (N, K), r)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# torch path; Triton fused dequant-matmul kernel; Triton dequant kernel + torch matmul.
PATHS = [("torch", 0), ("triton", 10**9), ("triton", 0)]


def _inputs(m: int, n: int, k: int, r: int, dtype: torch.dtype, lead: tuple[int, ...] = ()):
    gen = torch.Generator().manual_seed(m * 1000 + n + k + r)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(r, k, generator=gen) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(n, r, generator=gen) * 0.2).to(dtype).requires_grad_()
    dy = torch.randn(*lead, m, n, generator=gen).to(dtype)
    return x, a, b, dy


def _reference_grads(x, weight, a, b, scale, dy, bias=None, x_lora=None):
    """Reference output and gradients in float32 from the same (rounded) inputs."""
    leaves = [t.detach().float().requires_grad_() for t in (x, a, b)]
    bias_f = bias.detach().float().requires_grad_() if bias is not None else None
    xl = x_lora.detach().float() if x_lora is not None else None
    out = lora_linear_reference(leaves[0], weight, leaves[1], leaves[2], scale, bias_f, xl)
    out.backward(dy.float())
    grads = [t.grad for t in leaves] + ([bias_f.grad] if bias is not None else [])
    return out, grads


@pytest.mark.triton
@pytest.mark.parametrize("path", PATHS, ids=["torch", "triton-fused", "triton-dequant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "shape", "r"), CASES)
def test_lora_linear_nf4(make_nf4, assert_close, monkeypatch, m, shape, r, dtype, path):
    backend, fused_rows = path
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_ROWS", fused_rows)
    n, k = shape
    _, _, w = make_nf4(shape, dtype)
    x, a, b, dy = _inputs(m, n, k, r, dtype)
    with force_backend(backend):
        out = lora_linear(x, w, a, b, 2.0)
        out.backward(dy)
    ref, (gx, ga, gb) = _reference_grads(x, w, a, b, 2.0, dy)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="out")
    assert_close(x.grad, gx, dtype, what="dx")
    assert_close(a.grad, ga, dtype, what="dA")
    assert_close(b.grad, gb, dtype, what="dB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_dense_base_bias_and_batch_dims(assert_close, dtype):
    gen = torch.Generator().manual_seed(3)
    n, k, r = 33, 65, 4
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_()
    x, a, b, dy = _inputs(7, n, k, r, dtype, lead=(2,))
    out = lora_linear(x, weight, a, b, 0.5, bias=bias)
    out.backward(dy)
    ref, (gx, ga, gb, gbias) = _reference_grads(x, weight, a, b, 0.5, dy, bias=bias)
    assert out.shape == (2, 7, n)
    for got, exp, name in [
        (out, ref, "out"),
        (x.grad, gx, "dx"),
        (a.grad, ga, "dA"),
        (b.grad, gb, "dB"),
        (bias.grad, gbias, "dbias"),
    ]:
        assert_close(got, exp, dtype, what=name)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_dropout_branch(make_nf4, assert_close, backend):
    """peft's dropout: the LoRA branch sees dropout(x), the base branch x; grads reach x through both."""
    dtype = torch.float32
    _, _, w = make_nf4((64, 96), dtype)
    x, a, b, dy = _inputs(7, 64, 96, 8, dtype)
    torch.manual_seed(0)
    x_lora = torch.nn.functional.dropout(x, p=0.3, training=True)
    with force_backend(backend):
        out = lora_linear(x, w, a, b, 2.0, x_lora=x_lora)
        out.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.manual_seed(0)
    xl_ref = torch.nn.functional.dropout(x_ref, p=0.3, training=True)
    ref = lora_linear_reference(x_ref, w, a_ref, b_ref, 2.0, x_lora=xl_ref)
    ref.backward(dy)
    assert_close(out, ref, dtype, what="out")
    assert_close(x.grad, x_ref.grad, dtype, what="dx")
    assert_close(a.grad, a_ref.grad, dtype, what="dA")
    assert_close(b.grad, b_ref.grad, dtype, what="dB")


def test_lora_branch_runs_in_adapter_dtype(make_nf4, assert_close):
    """bf16 activations with float32 adapters (QLoRA's usual setup): grads come back in float32."""
    _, _, w = make_nf4((64, 96), torch.bfloat16)
    x, a, b, dy = _inputs(7, 64, 96, 8, torch.bfloat16)
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    out = lora_linear(x, w, a32, b32, 2.0)
    out.backward(dy)
    assert out.dtype == torch.bfloat16 and a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    _, (_, ga, gb) = _reference_grads(x, w, a32, b32, 2.0, dy)
    assert_close(a32.grad, ga, torch.bfloat16, what="dA")
    assert_close(b32.grad, gb, torch.bfloat16, what="dB")


def test_no_dense_weight_saved_for_backward(make_nf4, measure_saved):
    """The fused op keeps x and the [M, r] product, never the [N, K] dequantised weight."""
    n, k, m, r = 256, 512, 4, 8
    _, _, w = make_nf4((n, k), torch.float32)
    x, a, b, _ = _inputs(m, n, k, r, torch.float32)
    dense_bytes = n * k * 4
    fused = measure_saved(lambda: lora_linear(x, w, a, b, 1.0))
    reference = measure_saved(lambda: lora_linear_reference(x, w, a, b, 1.0))
    assert reference >= dense_bytes
    assert fused < dense_bytes // 4


def test_frozen_base_weight_required():
    weight = torch.randn(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(2, 8), weight, torch.randn(2, 8), torch.randn(8, 2), 1.0)
