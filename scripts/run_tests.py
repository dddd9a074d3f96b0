"""Run the test suite as `make test` / `make test-gpu` do: which pytest processes, and in what order.

The CPU kernel tests build the Triton kernels for the interpreter (`TRITON_INTERPRET=1`) for their whole pytest
process, after which the GPU tests (compiled kernels) would only skip. So `all` runs `tests` without `tests/gpu`
first and then, where CUDA exists, `tests/gpu` in a pytest process of its own (without `TRITON_INTERPRET` in its
environment); without CUDA it says that the GPU tests were not run. `gpu` runs `tests/gpu` alone.

Usage: python scripts/run_tests.py {all,gpu} [--dry-run] [PYTEST_ARGS...]
FINETUNE_TESTS_CUDA=0/1 overrides the CUDA check (the unit test of this wiring uses it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
NO_CUDA = "tests/gpu not run: no CUDA device here (make test-gpu runs them alone on a GPU machine)"


def cuda_available() -> bool:
    """Whether this machine has a CUDA device (FINETUNE_TESTS_CUDA=0/1 decides when set)."""
    forced = os.environ.get("FINETUNE_TESTS_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    return torch.cuda.is_available()


def plan(which: str, cuda: bool, extra: list[str] | None = None) -> list[list[str]]:
    """The pytest command lines to run, one process each, in order.

    Args:
        which: `all` (CPU suite, then the GPU tests where CUDA exists) or `gpu` (the GPU tests alone).
        cuda: Whether a CUDA device exists.
        extra: More pytest arguments, given to every process.

    Returns:
        The command lines; `gpu` on a machine without CUDA still runs them, so that pytest reports the skip reason.
    """
    extra = list(extra or [])
    gpu = [*PYTEST, "-m", "gpu", "tests/gpu", *extra]
    if which == "gpu":
        return [gpu]
    if which != "all":
        raise ValueError(f"unknown selection {which!r}: use all or gpu")
    return [[*PYTEST, "tests", "--ignore=tests/gpu", *extra], *([gpu] if cuda else [])]


def main(argv: list[str] | None = None) -> int:
    """Run (or with --dry-run print) the planned pytest processes; the first failing exit status is returned."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["all", "gpu"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args, extra = parser.parse_known_args(argv)
    cuda = cuda_available()
    commands = plan(args.which, cuda, extra)
    status = 0
    for command in commands:
        gpu = "tests/gpu" in command and "--ignore=tests/gpu" not in command
        print(("would run: " if args.dry_run else "running: ") + " ".join(command[1:]), flush=True)
        if args.dry_run:
            continue
        env = {k: v for k, v in os.environ.items() if not (gpu and k == "TRITON_INTERPRET")}
        status = status or subprocess.call(command, env=env)
    if args.which == "all" and not cuda:
        print(NO_CUDA, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
