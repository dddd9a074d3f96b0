"""bitsandbytes' 4-bit dequantization on AVX-512 CPUs, and our fix for it (finetune/model/bnb_cpu.py)."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from finetune.model import bnb_cpu


def _flat_reference(packed: torch.Tensor, qs) -> torch.Tensor:
    """NF4 dequantization by its definition: flat blocks of `blocksize` codes, each times its block's absmax."""
    codes = packed.view(-1)
    idx = torch.stack([(codes >> 4).long(), (codes & 15).long()], 1).view(-1)
    n = qs.shape.numel()
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]
    return (qs.code[idx[:n]] * scale).to(qs.dtype).view(qs.shape)


@pytest.mark.parametrize("shape", [(64, 96), (33, 96), (8, 160), (64, 64), (33, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_matches_the_definition_after_apply(shape, dtype, nested):
    bnb_cpu.apply()
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    assert torch.equal(bnbf.dequantize_4bit(packed, qs), _flat_reference(packed, qs))


@pytest.mark.parametrize("shape", [(33, 96), (64, 64)])
def test_linear4bit_trains_and_evaluates_on_the_weights_it_quantized(shape):
    """Forward with and without gradients and in eval mode: x @ W.T with W dequantized by the definition."""
    bnb_cpu.apply()
    out_f, in_f = shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(shape, generator=torch.Generator().manual_seed(1)),
                                     requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    bnb_cpu.fix_model(layer)
    expected_w = _flat_reference(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2))
    reference = x @ expected_w.t()
    torch.testing.assert_close(layer(x.clone().requires_grad_()), reference, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not bnb_cpu.affected(), reason="the faulty kernel runs on AVX-512 CPUs only")
def test_the_native_kernel_still_reads_rows_wrongly_here():
    """When this fails, bitsandbytes fixed its AVX-512 kernel: drop item 1 of finetune/model/bnb_cpu.py."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    rows = bnb_cpu.native_dequantize(packed, qs.absmax, 64, "nf4", 64, 96, torch.float32)
    assert not torch.equal(rows, _flat_reference(packed, qs))


class _OnCuda:
    device = torch.device("cuda", 0)  # a weight on the GPU (the device mocked: no CUDA on this machine)


class _Linear4bitOnCuda:
    def __init__(self) -> None:
        self.weight = _OnCuda()
        self.support_avx512bf16_for_cpu = True  # what bitsandbytes sets from the host CPU, GPU or not


class _ModelOnCuda:
    def __init__(self) -> None:
        self.layer = _Linear4bitOnCuda()

    def parameters(self):
        yield self.layer.weight

    def modules(self):
        yield self
        yield self.layer


def test_nothing_is_registered_or_recorded_for_a_model_on_cuda(monkeypatch):
    """A GPU machine whose host CPU has AVX-512: the 4-bit model goes to CUDA, so no CPU kernel is registered and the
    banner lists no CPU patch."""
    from finetune.model import loading
    from finetune.model.patches import applied
    from finetune.recipe.schema import QuantizationConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(bnb_cpu, "_applied", False)
    monkeypatch.setattr(torch.library, "register_kernel",
                        lambda *a, **k: pytest.fail("a CPU kernel was registered for a model on CUDA"))
    loading.bnb_config(QuantizationConfig(mode="nf4"), torch.bfloat16)
    model = _ModelOnCuda()
    loading._fix_bitsandbytes(model)
    assert applied(model) == []
    assert model.layer.support_avx512bf16_for_cpu is True  # left as bitsandbytes set it: never used on CUDA
    assert bnb_cpu.fix_model(model) == 0
    assert bnb_cpu.affected("cpu") and not bnb_cpu.affected("cuda")
