"""Launch settings of the Triton kernels, chosen by shape for large GPUs; the interpreter keeps the defaults.

Under the Triton interpreter (the CPU tests) and on GPUs below compute capability 8.0 every kernel launches as it
always has: 4 warps, 4096-wide slices of a cross-entropy row, 64 x 64 x 64 tiles of the NF4 matmul. On large GPUs
(A100, H100/H200) the settings follow the shape: more warps for wider rows (RMSNorm, cross-entropy), wider slices of a
cross-entropy row, and 128-wide pipelined tiles of the NF4 matmul when there are many rows to multiply.

The settings are chosen, not autotuned: `triton.autotune` compiles and times every config on each new shape, which
would spend a GPU run's first minutes compiling. A config a GPU cannot fit (Triton's `OutOfResources`) is launched
again with the defaults, and that shape keeps them for the rest of the process (:func:`run`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ELEMENTWISE_MIN = 2**20  # values an element-wise kernel needs before wider blocks pay on a large GPU
_fallen_back: set[tuple] = set()  # shapes whose large-GPU config did not fit: the defaults from then on


@dataclass(frozen=True)
class Launch:
    """One kernel launch's settings: warps, pipeline stages (None: Triton's default), block width and matmul tiles."""

    num_warps: int = 4
    num_stages: int | None = None
    block: int = 0
    tiles: tuple[int, int, int] | None = None  # BM, BP, BQ of the NF4 matmul

    def options(self) -> dict[str, int]:
        """The launch keywords Triton takes (`num_warps`, `num_stages`)."""
        return {"num_warps": self.num_warps, **({"num_stages": self.num_stages} if self.num_stages else {})}


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def large_gpu(t: torch.Tensor, interpreted: bool) -> bool:
    """True for a CUDA tensor on a GPU of compute capability 8.0 or more, with compiled (not interpreted) kernels."""
    if interpreted or t.device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 8


def row_warps(width: int, large: bool) -> int:
    """Warps of a program that owns one row of `width` (a power of two) elements."""
    if not large:
        return 4
    return 4 if width <= 1024 else 8 if width <= 4096 else 16 if width <= 16384 else 32


def cross_entropy_rows(vocab: int, large: bool) -> Launch:
    """A cross-entropy row program: the width of the slices it streams the row in, and its warps."""
    if not large:
        return Launch(block=min(next_power_of_2(vocab), 4096))
    block = min(next_power_of_2(vocab), 16384)
    return Launch(num_warps=row_warps(block, True), block=block)


def elementwise(n: int, large: bool) -> Launch:
    """An element-wise kernel over `n` values: its block, and warps (wider blocks with more warps on large GPUs once
    there are enough values to fill them)."""
    if not large or n < ELEMENTWISE_MIN:
        return Launch(block=1024)
    return Launch(num_warps=8, block=4096)


def nf4_matmul(m: int, p: int, large: bool) -> Launch:
    """Tiles of `[m, q] @ op(W) -> [m, p]` with W dequantised tile by tile."""
    bm = max(16, min(64, next_power_of_2(m)))
    if not large or m < 64 or p < 128:
        return Launch(tiles=(bm, 64, 64))
    if m >= 128:
        return Launch(num_warps=8, num_stages=3, tiles=(128, 128, 64))
    return Launch(num_warps=4, num_stages=3, tiles=(64, 128, 64))


def run(key: tuple, chosen: Launch, default: Launch, launch: Callable[[Launch], Any]) -> Any:
    """`launch(chosen)`, or `launch(default)` where this shape's chosen config did not fit the GPU (then and after)."""
    if chosen == default or key in _fallen_back:
        return launch(default)
    try:
        return launch(chosen)
    except Exception as e:  # noqa: BLE001 - only Triton's OutOfResources is caught, by name (no triton import here)
        if type(e).__name__ != "OutOfResources":
            raise
        _fallen_back.add(key)
        return launch(default)
