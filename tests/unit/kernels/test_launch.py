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
