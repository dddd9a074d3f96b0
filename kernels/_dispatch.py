"""Backend selection: Triton on CUDA (or under the Triton interpreter when forced), PyTorch elsewhere.

The choice is made once per op call, in the forward pass, and stored on the autograd context so the
backward pass uses the same backend even if it runs outside a :func:`force_backend` block.

Selection order:

1. a :func:`force_backend` context (used by tests), else
2. the ``FINETUNE_KERNELS_BACKEND`` environment variable (``auto``, ``torch`` or ``triton``), else
3. ``auto``: Triton when every tensor is on CUDA and ``triton`` is importable, the PyTorch path otherwise.
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
    """Returns whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """Returns whether ``TRITON_INTERPRET`` is set, i.e. Triton kernels run on CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no")


def current_backend() -> str:
    """Returns the requested backend: ``auto``, ``torch`` or ``triton``."""
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
        name: ``auto``, ``torch`` or ``triton``. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
            set before ``triton`` was first used.

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
        *tensors: The op's tensor inputs (``None`` entries are ignored).

    Returns:
        True for the Triton path, False for the PyTorch path.

    Raises:
        RuntimeError: If ``triton`` was forced but cannot run here.
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
    if not on_cuda and not interpreter_active():
        raise RuntimeError("backend 'triton' forced on CPU tensors: set TRITON_INTERPRET=1 before importing triton")
    return True
