"""Launch settings (finetune/kernels/launch.py): chosen by shape on large GPUs, the defaults under the interpreter,
a config that does not fit falls back to the defaults; and the cross-entropy gradient written straight in bf16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.kernels import launch

CUDA = SimpleNamespace(device=torch.device("cuda", 0))  # a tensor's device on a GPU (mocked: no CUDA here)


def test_large_gpus_get_settings_by_shape_and_the_interpreter_the_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    assert launch.large_gpu(CUDA, interpreted=False)
    assert not launch.large_gpu(CUDA, interpreted=True) and not launch.large_gpu(torch.empty(1), interpreted=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not launch.large_gpu(CUDA, interpreted=False)
    # the defaults, as the kernels launched before: 4 warps, 4096-wide slices, 64 x 64 x 64 tiles
    assert launch.cross_entropy_rows(128256, False) == launch.Launch(num_warps=4, block=4096)
    assert launch.nf4_matmul(4096, 2048, False) == launch.Launch(tiles=(64, 64, 64))
    assert launch.nf4_matmul(8, 2048, False) == launch.Launch(tiles=(16, 64, 64))
    assert launch.row_warps(2048, False) == 4 and launch.Launch().options() == {"num_warps": 4}
    # large GPUs, by shape
    assert launch.cross_entropy_rows(128256, True) == launch.Launch(num_warps=16, block=16384)
    assert launch.cross_entropy_rows(1000, True) == launch.Launch(num_warps=4, block=1024)
    assert [launch.row_warps(w, True) for w in (512, 2048, 8192, 32768)] == [4, 8, 16, 32]
    big = launch.nf4_matmul(4096, 8192, True)
    assert big.tiles == (128, 128, 64) and big.options() == {"num_warps": 8, "num_stages": 3}
    assert launch.nf4_matmul(96, 8192, True).tiles == (64, 128, 64)
    assert launch.nf4_matmul(8, 8192, True) == launch.nf4_matmul(8, 8192, False)  # few rows: the defaults
    assert launch.elementwise(2**24, False) == launch.Launch(block=1024) == launch.elementwise(1000, True)
    assert launch.elementwise(2**24, True) == launch.Launch(num_warps=8, block=4096)


class OutOfResources(Exception):
    """Stands for triton.runtime.errors.OutOfResources (caught by name)."""


def test_a_config_that_does_not_fit_falls_back_to_the_defaults_for_that_shape(monkeypatch):
    monkeypatch.setattr(launch, "_fallen_back", set())
    big, small = launch.Launch(num_warps=32, block=32768), launch.Launch(block=4096)
    tried = []

    def kernel(cfg):
        tried.append(cfg.num_warps)
        if cfg is big:
            raise OutOfResources("out of resource: shared memory")
        return cfg.block

    assert launch.run(("ce", 128256), big, small, kernel) == 4096 and tried == [32, 4]
    assert launch.run(("ce", 128256), big, small, kernel) == 4096 and tried == [32, 4, 4]  # remembered
    with pytest.raises(ValueError):  # anything else is a real error
        launch.run(("other",), big, small, lambda cfg: (_ for _ in ()).throw(ValueError("bad")))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_gradient_written_in_half_precision_is_the_cast_of_the_float32_one(dtype, monkeypatch):
    from finetune.kernels import cross_entropy_triton as ce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 4
    labels = torch.tensor([3, -100, 999, 0, 17, 512])
    lse, _ = ce.lse_and_nll(logits, labels, -100)
    grad_nll = torch.rand(6, generator=g)
    chosen = []
    real_run = launch.run
    monkeypatch.setattr(launch, "run", lambda key, c, d, fn: (chosen.append(c == d), real_run(key, c, d, fn))[1])
    out = torch.empty(6, 1000, dtype=dtype)
    assert ce.nll_grad_(logits, labels, lse, grad_nll, -100, out=out) is out
    expected = ce.nll_grad_(logits.clone(), labels, lse, grad_nll, -100)  # in place, float32
    assert torch.equal(out, expected.to(dtype))  # rounded to nearest, bit for bit
    assert out[1].abs().sum() == 0  # the ignored row
    assert chosen == [True, True]  # the interpreter launched with the defaults


@pytest.mark.triton
def test_the_large_gpu_settings_compute_the_same(make_nf4, monkeypatch):
    """Every kernel run with its large-GPU block and tile shapes (the interpreter ignores warps and stages) gives the
    results of the default launch: the 128-wide NF4 tiles, 8192-wide CE slices, 4096-value element-wise blocks."""
    from finetune.kernels import activations_triton, cross_entropy_triton, nf4_triton, rmsnorm_triton, rope_triton

    g = torch.Generator().manual_seed(1)
    _, _, w = make_nf4((256, 192), torch.float32, True)
    x = torch.randn(130, 192, generator=g)
    logits, labels = torch.randn(3, 5000, generator=g), torch.tensor([5, 4999, -100])
    a, b = torch.randn(3 * 4096 + 5, generator=g), torch.randn(3 * 4096 + 5, generator=g)
    h = torch.randn(2, 5000, generator=g)
    q, cos, sin = (torch.randn(*shape, generator=g) for shape in ((1, 4, 3, 8), (1, 3, 8), (1, 3, 8)))
    _, _, big = make_nf4((128, 128), torch.bfloat16, True)

    def everything():
        ce = cross_entropy_triton.lse_and_nll(logits, labels, -100)
        grad = cross_entropy_triton.nll_grad_(logits.clone(), labels, ce[0], torch.ones(3), -100)
        return (nf4_triton.nf4_matmul(x, w, True), nf4_triton.dequantize(big), *ce, grad,
                activations_triton.swiglu_forward(a, b), *activations_triton.swiglu_backward(b, a, b),
                *rmsnorm_triton.rmsnorm_forward(h, torch.ones(5000), 1e-6, torch.float32),
                rope_triton.rope_apply(q, cos, sin, False))

    default = everything()
    configs = []
    real_run = launch.run
    monkeypatch.setattr(launch, "large_gpu", lambda t, interpreted: True)
    monkeypatch.setattr(launch, "ELEMENTWISE_MIN", 4096)  # small tensors, the large element-wise blocks
    monkeypatch.setattr(launch, "_fallen_back", set())
    monkeypatch.setattr(launch, "run", lambda key, c, d, fn: (configs.append((key[0], c)), real_run(key, c, d, fn))[1])
    large = everything()
    chosen = dict(configs)
    assert chosen["nf4"].tiles == (128, 128, 64) and chosen["lse"].block == 8192 and chosen["grad"].block == 8192
    assert chosen["swiglu"].block == 4096 and chosen["dequant"].block == 4096 and chosen["rmsnorm"].num_warps == 16
    for got, expected in zip(large, default, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
