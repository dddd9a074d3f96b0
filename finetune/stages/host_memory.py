"""Host memory of CPU training at long context: freed blocks go back to the system (`training.release_host_memory`).

glibc's allocator serves a request from its heap unless it is larger than the mmap threshold, which starts at 128 KB
and rises to the size of each large block freed (up to 32 MB). After the first few layers of a long row have freed
their tensors, every later activation of the same size is served from the heap, whose freed space is reused only
when it fits and is seldom returned: the process's resident memory climbs layer after layer while what autograd keeps
stays small. Measured on the benchmark's 38M Llama, one 8,192-token row, forward and backward (1 thread, LoRA,
gradient checkpointing, tiled MLP): 1.69 GB above the loaded model with the default, 0.49 GB with the threshold fixed
at 1 MB (so every block of 1 MB or more is mapped on its own and unmapped when freed), about 15% slower (fresh pages
are zero-filled by the kernel). `auto` fixes the threshold for CPU training of rows longer than 4,096 tokens, where
the savings are large; `on` always on the CPU; `off` leaves glibc's default. Set through `mallopt`, for this process,
before the model loads; other C libraries (musl, macOS) are left as they are, with the reason printed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20
AUTO_FROM = 4096  # `auto`: rows longer than this many tokens


def wanted(setting: str, max_length: int, cuda: bool) -> bool:
    """Whether `training.release_host_memory` asks for the fixed threshold in this run."""
    if cuda or setting == "off":
        return False
    return setting == "on" or max_length > AUTO_FROM


def apply(recipe: Any, cuda: bool, libc: Any = None) -> str | None:
    """Fix glibc's mmap threshold when the recipe's stages want it; returns the line to print (None: nothing to say).
    `libc`: the C library to call (a test's stand-in)."""
    stages = recipe.effective_stages()
    settings = [(recipe.stage_training(s).release_host_memory, recipe.stage_data(s).max_length) for s in stages]
    if not any(wanted(setting, length, cuda) for setting, length in settings):
        return None
    if libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return "host memory: not glibc, its allocator is left as it is (training.release_host_memory)"
    if libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) != 1:
        return "host memory: glibc refused the mmap threshold; left as it is (training.release_host_memory)"
    return (f"host memory: blocks of {THRESHOLD >> 20} MB or more are mapped on their own and returned to the system "
            "when freed, so resident memory follows the tensors alive (training.release_host_memory; about 15% "
            "slower on long rows)")
