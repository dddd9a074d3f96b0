"""Triton kernels compiled for a CUDA GPU, at realistic sizes, against the PyTorch references.

Skipped without CUDA, and skipped when this process built the kernels for the Triton interpreter (the CPU
kernel tests in `tests/unit/kernels` do that for the whole pytest process): run `pytest -m gpu tests/gpu`
on its own on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # normwise, float32 reference


@pytest.fixture(autouse=True)
def _needs_compiled_triton():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    from finetune.kernels._dispatch import triton_interpreted

    if triton_interpreted():
        pytest.skip("kernels were built for the Triton interpreter in this process; run tests/gpu on its own")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-6), f"{what}: {err:.3g} vs scale {scale:.3g} ({dtype})"


def _nf4(shape, dtype, nested=True):
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4 import NF4Weight

    weight = (torch.randn(shape, device="cuda") * 0.5).to(dtype)
    packed, qs = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return packed, qs, NF4Weight.from_quant_state(packed, qs)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_bit_exact_vs_bnb_cuda(dtype, nested):
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4 import dequantize_nf4

    packed, qs, w = _nf4((4096, 1024 + 64), dtype, nested)
    got = dequantize_nf4(w)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("fused_rows", [0, 10**9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 64, 1000])
def test_lora_linear_cuda(monkeypatch, m, dtype, fused_rows):
    import finetune.kernels.lora_linear as ll

    monkeypatch.setattr(ll, "NF4_FUSED_MAX_ROWS", fused_rows)
    n, k, r = 1536, 1024, 16
    _, _, w = _nf4((n, k), dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, device="cuda") * 0.05).to(dtype).requires_grad_()
    b = (torch.randn(n, r, device="cuda") * 0.05).to(dtype).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    out = ll.lora_linear(x, w, a, b, 2.0)
    out.backward(dy)
    leaves = [t.detach().float().requires_grad_() for t in (x, a, b)]
    ref = ll.lora_linear_reference(leaves[0], w, leaves[1], leaves[2], 2.0)
    ref.backward(dy.float())
    _close(out, ref, dtype, "out")
    for got, leaf, name in zip((x, a, b), leaves, ("dx", "dA", "dB"), strict=True):
        _close(got.grad, leaf.grad, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_mlp_and_qkv_cuda(dtype):
    from finetune.kernels.lora_linear import LoRAParams
    from finetune.kernels.lora_mlp import lora_mlp, lora_mlp_reference
    from finetune.kernels.lora_qkvo import lora_qkv, lora_qkv_reference

    def proj(out_f, in_f):
        a = (torch.randn(8, in_f, device="cuda") * 0.05).to(dtype).requires_grad_()
        b = (torch.randn(out_f, 8, device="cuda") * 0.05).to(dtype).requires_grad_()
        return LoRAParams(_nf4((out_f, in_f), dtype)[2], a, b, 2.0)

    x = torch.randn(2, 300, 512, device="cuda", dtype=dtype)
    mlp = [proj(1408, 512), proj(1408, 512), proj(512, 1408)]
    _close(
        lora_mlp(x, *mlp),
        lora_mlp_reference(x.float(), *[p._replace(a=p.a.float(), b=p.b.float()) for p in mlp]),
        dtype,
        "mlp",
    )
    qkv = [proj(512, 512), proj(128, 512), proj(128, 512)]
    for got, exp in zip(
        lora_qkv(x, *qkv),
        lora_qkv_reference(x.float(), *[p._replace(a=p.a.float(), b=p.b.float()) for p in qkv]),
        strict=True,
    ):
        _close(got, exp, dtype, "qkv")


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_ce_cuda(dtype, frozen_head):
    """Both gradient paths: the backward's (head trained) and the one formed in the forward (frozen head, as LoRA
    trains), each written straight in the compute dtype by the kernel."""
    from finetune.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference

    hidden = torch.randn(2048, 512, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(32000, 512, device="cuda") * 0.05).to(dtype).requires_grad_(not frozen_head)
    labels = torch.randint(0, 32000, (2048,), device="cuda")
    labels[::7] = -100
    loss = chunked_cross_entropy(hidden, weight, labels)
    loss.backward()
    hf, wf = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = cross_entropy_reference(hf, wf, labels)
    ref.backward()
    _close(loss, ref, dtype, "loss")
    _close(hidden.grad, hf.grad, dtype, "dh")
    if not frozen_head:
        _close(weight.grad, wf.grad, dtype, "dW")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_rope_cuda(dtype):
    from finetune.kernels.rmsnorm import rms_norm, rms_norm_reference
    from finetune.kernels.rope import apply_rope, apply_rope_reference

    x = torch.randn(4, 333, 4096, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    _close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype, "rmsnorm vs same-dtype reference")
    q = torch.randn(2, 333, 32, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 333, 8, 128, device="cuda", dtype=dtype).transpose(1, 2)
    angle = torch.rand(2, 333, 64, device="cuda") * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
    for got, exp in zip(
        apply_rope(q, k, cos, sin), apply_rope_reference(q.float(), k.float(), cos.float(), sin.float()), strict=True
    ):
        _close(got, exp, dtype, "rope")


def test_auto_dispatch_picks_triton_on_cuda():
    from finetune.kernels._dispatch import use_triton

    assert use_triton(torch.ones(1, device="cuda"))
    assert not use_triton(torch.ones(1))
