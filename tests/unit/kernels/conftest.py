"""Kernel tests: Triton kernels run on CPU through the Triton interpreter.

`TRITON_INTERPRET` is read when a `@triton.jit` kernel is *defined* (and by a few Triton internals at launch),
so this file sets it before importing this package's `*_triton` modules, and leaves it set for the rest of the
pytest process (Triton's internals disagree with themselves if it is switched off again). Importing `torch`,
`transformers` or `bitsandbytes` earlier is harmless: those import `triton` itself, so the kernels use only
Triton builtins (see `finetune.kernels.rmsnorm_triton`). Nothing else in this repository runs Triton kernels
on CPU, so the setting has no effect outside these tests; GPU tests (`tests/gpu`) detect interpreted kernels
and skip, so run them in their own pytest process.

Tolerances (normwise: `max|actual - expected| <= tol * max|expected|`, expected computed in float32 from the
same inputs) are in `TOL` below; bf16 element-wise forwards are also checked to one ulp against PyTorch's own
bf16 computation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import pytest
import torch

_TRITON_MODULES = ("nf4_triton", "activations_triton", "cross_entropy_triton", "rmsnorm_triton", "rope_triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _TRITON_MODULES:
        importlib.import_module(f"finetune.kernels.{_name}")

# The NF4 tests compare with bitsandbytes' dequantization, whose native kernel is wrong on AVX-512 CPUs for weights
# whose last dimension is not a multiple of the block size; training applies the same fix (finetune/model/bnb_cpu.py).
from finetune.model import bnb_cpu  # noqa: E402

bnb_cpu.apply()

#: Normwise relative tolerance per dtype: "elem" for element-wise ops, "mm" for anything with a matmul.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"elem": 1e-5, "mm": 2e-5},
    torch.float16: {"elem": 2e-3, "mm": 5e-3},
    torch.bfloat16: {"elem": 1.6e-2, "mm": 3e-2},
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pytest_configure(config: pytest.Config) -> None:
    """Registers the `triton` marker (tests that run a Triton kernel, here through the interpreter)."""
    config.addinivalue_line("markers", "triton: runs a Triton kernel (through the interpreter on CPU)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skips tests marked `triton` when the package is missing."""
    for item in items:
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "mm", what: str = "") -> None:
    """Asserts normwise closeness with the tolerance of `TOL[dtype][kind]`."""
    a, e = actual.detach().float(), expected.detach().float()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    tol = TOL[dtype][kind]
    assert err <= tol * max(scale, 1e-6), f"{what}: max err {err:.3g} > {tol} * {scale:.3g} ({dtype}, {kind})"


def within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Asserts two bf16 tensors differ by at most one unit in the last place, element by element."""
    a, e = actual.float(), expected.float()
    ulp = torch.where(e == 0, torch.full_like(e, 2.0**-133), 2.0 ** (torch.floor(torch.log2(e.abs())) - 7))
    assert ((a - e).abs() <= ulp * 1.0001).all(), f"more than one bf16 ulp apart: {(a - e).abs().max()}"


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these shapes are tiny, and on a busy 2-core machine threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """The :func:`close` checker."""
    return close


@pytest.fixture
def assert_one_ulp() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The :func:`within_one_ulp` checker."""
    return within_one_ulp


def quantize(
    shape: tuple[int, int],
    dtype: torch.dtype,
    nested: bool = True,
    quant_type: str = "nf4",
    seed: int = 0,
    blocksize: int = 64,
):
    """Quantises a random weight with bitsandbytes; returns `(packed, quant_state, NF4Weight)`."""
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4 import NF4Weight

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    packed, qs = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, qs, NF4Weight.from_quant_state(packed, qs)


@pytest.fixture
def make_nf4() -> Callable[..., tuple]:
    """The :func:`quantize` helper."""
    return quantize


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensor storages autograd saves for backward while running `fn`."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.fixture
def measure_saved() -> Callable[[Callable[[], torch.Tensor]], int]:
    """The :func:`saved_bytes` helper."""
    return saved_bytes
