"""NF4 dequantisation: bit-exact against bitsandbytes; fused dequant-matmul against a dense matmul."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from finetune.kernels import force_backend
from finetune.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, nf4_weight_of

SHAPES = [(64, 64), (96, 64), (64, 96), (33, 65), (7, 33)]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_dequant_bit_exact(make_nf4, shape, dtype, nested):
    packed, qs, w = make_nf4(shape, dtype, nested)
    expected = bnbf.dequantize_4bit(packed, qs)
    assert torch.equal(dequantize_nf4_reference(w).view(-1), expected.view(-1))
    with force_backend("torch"):
        assert torch.equal(dequantize_nf4(w).view(-1), expected.view(-1))


@pytest.mark.triton
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (33, 65), (7, 33)])
def test_triton_dequant_bit_exact(make_nf4, shape, dtype, nested, quant_type):
    packed, qs, w = make_nf4(shape, dtype, nested, quant_type)
    expected = bnbf.dequantize_4bit(packed, qs)
    with force_backend("triton"):
        got = dequantize_nf4(w)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.view(-1), expected.view(-1))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "shape", "r"), [(1, (64, 96), 4), (7, (96, 64), 8), (33, (33, 65), 8)])
def test_fused_nf4_matmul(make_nf4, assert_close, dtype, m, shape, r):
    from finetune.kernels.nf4_triton import nf4_matmul

    _, _, w = make_nf4(shape, dtype)
    dense = dequantize_nf4_reference(w).float()
    gen = torch.Generator().manual_seed(1)
    n, k = shape
    x = torch.randn(m, k, generator=gen).to(dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)
    u, v = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    bias = torch.randn(n, generator=gen).to(dtype)
    got = nf4_matmul(x, w, True, bias, (u, v, 0.5))
    assert_close(got, x.float() @ dense.t() + bias.float() + 0.5 * u @ v, dtype, what="x @ W.T")
    got_t = nf4_matmul(dy, w, False)
    assert_close(got_t, dy.float() @ dense, dtype, what="dy @ W")


def test_nf4_weight_of_reads_linear4bit():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(96, 33, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(33, 96), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantises on the move, as from_pretrained does
    w = nf4_weight_of(layer)
    assert w is not None and w.shape == (33, 96) and w.nested
    assert torch.equal(dequantize_nf4_reference(w), bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert nf4_weight_of(torch.nn.Linear(4, 4)) is None
