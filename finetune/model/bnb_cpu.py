"""Fixes for bitsandbytes' 4-bit CPU paths on AVX-512 CPUs (bitsandbytes 0.50.2, the version we pin).

1. Its native CPU kernel for the `bitsandbytes::dequantize_4bit` op reads the packed weight row by row and gets the
   blocks wrong when the last dimension is not a multiple of the block size (e.g. a 33 x 96 weight in blocks of 64):
   most values come out scaled by another block's absmax. Every 4-bit matmul on CPU goes through that op (Linear4bit
   forward and backward through `gemm_4bit`, peft's merge, our merged export), so a QLoRA run on such a CPU trains
   against a different base than the one it quantized. `apply()` registers a CPU kernel for the op that calls the same
   native function on the weight as one flat row (where its blocks are the flat blocks every other backend uses) and
   falls back to bitsandbytes' own Python implementation where bitsandbytes does (odd sizes, blocks >= 2048).
2. On CPUs with AVX-512 bf16, Linear4bit repacks its weight for a CPU inference kernel on the first forward in eval
   mode; that fails for output sizes that are not a multiple of 32 and needs a kernel downloaded from the Hub.
   `fix_model()` turns that repacking off on a loaded model (per instance).

CUDA, and CPUs without AVX-512, are not affected; there both functions do nothing: a model that goes to (or is on) a
CUDA device gets neither, whatever the host CPU, so a GPU run's banner lists no CPU patch.
`tests/unit/test_bnb_cpu.py` fails by name when a bitsandbytes upgrade fixes the native kernel (then delete item 1).
"""

from __future__ import annotations

import ctypes as ct
from math import prod
from typing import Any

_OP = "bitsandbytes::dequantize_4bit"
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_applied = False


def affected(device: str = "cpu") -> bool:
    """True where the faulty native kernel runs: bitsandbytes' CPU backend (a model on `device` "cpu") on an AVX-512
    CPU."""
    import torch

    return device == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def native_dequantize(A: Any, absmax: Any, blocksize: int, quant_type: str, rows: int, cols: int, dtype: Any) -> Any:
    """bitsandbytes' native CPU dequantization of `rows` x `cols` values (each row in blocks of its own)."""
    import torch
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    out = torch.empty((rows, cols), dtype=dtype, device=A.device)
    fn = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_DTYPE_NAMES[str(dtype).removeprefix('torch.')]}")
    fn(get_ptr(A.view(torch.uint8)), get_ptr(absmax.float()), get_ptr(out), ct.c_longlong(blocksize),
       ct.c_longlong(rows), ct.c_longlong(cols))
    return out


def _dequantize_4bit_cpu(A: Any, absmax: Any, blocksize: int, quant_type: str, shape: Any, dtype: Any) -> Any:
    n = prod(shape)
    if n % 2 or blocksize >= 2048:  # where bitsandbytes itself uses its Python path
        import torch
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                                        shape, dtype)
    return native_dequantize(A.contiguous(), absmax.contiguous(), blocksize, quant_type, 1, n, dtype).reshape(shape)


def apply(device: str = "cpu") -> bool:
    """Register the flat-row CPU kernel for bitsandbytes' dequantize_4bit op on affected CPUs (once per process).

    Args:
        device: Where the 4-bit model lives (`cuda`: nothing is registered, its dequantization never runs on the CPU).

    Returns True when it is in place (for a model on the CPU).
    """
    global _applied
    if device != "cpu":
        return False
    if _applied:
        return True
    if not affected(device):
        return False
    import warnings

    import bitsandbytes  # noqa: F401  (defines the op and its kernels first)
    import torch

    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        torch.library.register_kernel(_OP, "cpu", _dequantize_4bit_cpu)
    _applied = True
    return True


def fix_model(model: Any) -> int:
    """Turn off the AVX-512 bf16 inference repacking on every Linear4bit of `model` whose weight is on the CPU;
    returns how many it changed (none on CUDA)."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "device", None) is not None and weight.device.type != "cpu":
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
