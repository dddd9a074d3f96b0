"""Backend selection: Triton on CUDA (or under the Triton interpreter when forced), PyTorch elsewhere.

The choice is made once per op call, in the forward pass, and stored on the autograd context so the
backward pass uses the same backend even if it runs outside a :func:`force_backend` block.

Selection order:

1. a :func:`force_backend` context (used by tests), else
2. the `FINETUNE_KERNELS_BACKEND` environment variable (`auto`, `torch` or `triton`), else
3. `auto`: Triton when every tensor is on CUDA and `triton` is importable, the PyTorch path otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
_ENV_VAR = "FINETUNE_KERNELS_BACKEND"
_forced: list[str] = []


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Returns whether the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """Returns whether `TRITON_INTERPRET` is set, i.e. Triton kernels run on CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no")


def current_backend() -> str:
    """Returns the requested backend: `auto`, `torch` or `triton`."""
    if _forced:
        return _forced[-1]
    value = os.environ.get(_ENV_VAR, "auto").lower()
    if value not in BACKENDS:
        raise ValueError(f"{_ENV_VAR}={value!r}: expected one of {BACKENDS}")
    return value


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Forces a backend for the ops called inside the block.

    Args:
        name: `auto`, `torch` or `triton`. Forcing `triton` on CPU tensors needs `TRITON_INTERPRET=1`
            set before `triton` was first used.

    Yields:
        Nothing; the previous choice is restored on exit.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {BACKENDS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decides whether an op on these tensors runs its Triton kernel.

    Args:
        *tensors: The op's tensor inputs (`None` entries are ignored).

    Returns:
        True for the Triton path, False for the PyTorch path.

    Raises:
        RuntimeError: If `triton` was forced but cannot run here.
    """
    mode = current_backend()
    if mode == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend 'triton' forced but the triton package is not installed (pip install triton)")
    if not on_cuda and not (interpreter_active() or triton_interpreted()):
        raise RuntimeError("backend 'triton' forced on CPU tensors: set TRITON_INTERPRET=1 before importing triton")
    return True


def kernel_interpreted(kernel: object) -> bool:
    """Returns whether a `@triton.jit` object was created under the interpreter (so runs on CPU via numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def triton_interpreted() -> bool:
    """Returns whether this package's Triton kernels were built for the interpreter.

    The decision is taken when the `*_triton` modules are first imported (`TRITON_INTERPRET` read at
    `@triton.jit` time), so a test harness may set the variable, import them, and unset it again.
    """
    if not triton_available():
        return False
    from finetune.kernels import nf4_triton

    return kernel_interpreted(nf4_triton._dequant_kernel)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Returns the autocast dtype if autocast is enabled for `device_type`, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_floating(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """Casts a floating tensor to `dtype` (autograd-tracked); leaves None and non-float tensors alone."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)
