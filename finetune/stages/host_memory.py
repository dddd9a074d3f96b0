"""Host memory of CPU training at long context: freed blocks go back to the system (`training.release_host_memory`).

glibc's allocator serves a request from its heap unless it is larger than the mmap threshold, which starts at 128 KB
and rises to the size of each large block freed (up to 32 MB). After the first few layers of a long row have freed
their tensors, every later activation of the same size is served from the heap, whose freed space is reused only
when it fits and is seldom returned: the process's resident memory climbs layer after layer while what autograd keeps
stays small. Measured on the benchmark's 38M Llama, one 8,192-token row, forward and backward (1 thread, LoRA,
gradient checkpointing, tiled MLP): 1.69 GB above the loaded model with the default, 0.49 GB with the threshold fixed
at 1 MB (so every block of 1 MB or more is mapped on its own and unmapped when freed), about 15% slower (fresh pages
are zero-filled by the kernel). On shorter rows the zero-filling costs more than it saves time: SmolLM2-135M, 4 x
113-1,010-token rows per micro-batch, peaked at 5.5 GB with glibc's default, 2.7 GB at 1 MB (31% slower) and 3.9 GB
at 4 MB (within the noise of the default's speed): the hidden-size activations (a few MB each) are reused from the
heap as they are, the larger ones are mapped. `auto` on the CPU: 1 MB for rows longer than 4,096 tokens, 4 MB
otherwise; `on`: 1 MB; `off` leaves glibc's default. Set through `mallopt`, for this process,
before the model loads; other C libraries (musl, macOS) are left as they are, with the reason printed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20  # `on`, and `auto` for long rows: every block of 1 MB or more
LARGE = 4 << 20  # `auto` for shorter rows: blocks of 4 MB or more
AUTO_FROM = 4096  # `auto`: rows longer than this many tokens get THRESHOLD


def wanted(setting: str, max_length: int, cuda: bool) -> int | None:
    """The mmap threshold `training.release_host_memory` asks for in this run (None: glibc's default)."""
    if cuda or setting == "off":
        return None
    if setting == "on" or max_length > AUTO_FROM:
        return THRESHOLD
    return LARGE


def apply(recipe: Any, cuda: bool, libc: Any = None) -> str | None:
    """Fix glibc's mmap threshold when the recipe's stages want it; returns the line to print (None: nothing to say).
    `libc`: the C library to call (a test's stand-in)."""
    stages = recipe.effective_stages()
    settings = [(recipe.stage_training(s).release_host_memory, recipe.stage_data(s).max_length) for s in stages]
    thresholds = [t for setting, length in settings if (t := wanted(setting, length, cuda)) is not None]
    if not thresholds:
        return None
    threshold = min(thresholds)  # the stage with the longest rows decides
    if libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return "host memory: not glibc, its allocator is left as it is (training.release_host_memory)"
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return "host memory: glibc refused the mmap threshold; left as it is (training.release_host_memory)"
    cost = "about 15% slower on long rows" if threshold == THRESHOLD else "a few percent slower"
    return (f"host memory: blocks of {threshold >> 20} MB or more are mapped on their own and returned to the system "
            f"when freed, so resident memory follows the tensors alive (training.release_host_memory; {cost})")
