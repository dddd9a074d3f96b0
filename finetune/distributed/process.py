"""Which process am I, and the collectives every stage needs: rank, world size, waiting, gathering.

Nothing here imports torch at module level, so `ft --help` and `ft validate` stay fast. Only the main process (global
rank 0) writes the run folder, logs and uploads (`is_main_process`); the others wait for it where they read what it
wrote (`wait_for_everyone`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from finetune.recipe.schema import Recipe


def world_size() -> int:
    """Number of processes in this run (1 when not started by a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank of this process (0 when not started by a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the one process that writes files, logs and uploads."""
    return rank() == 0


def wait_for_everyone() -> None:
    """Block until every process gets here (no-op with one process)."""
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState

    # Same device choice as the trainer's arguments (use_cpu without CUDA), so the process group is the one it reuses.
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def any_process(flag: bool) -> bool:
    """True when `flag` is true on at least one process (a collective: every process must call it at the same point).

    Decisions that end or redirect training (a stop signal that reached one process first) must be the same on all of
    them, or the processes that go on wait forever in the next gradient all-reduce.
    """
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def silence_other_processes() -> None:
    """Send the stdout of every process but the main one to /dev/null: one copy of each progress line and summary.

    Warnings and errors (stderr) stay visible from every process.
    """
    if world_size() > 1 and not is_main_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def gathered_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The full weights of a model sharded over the processes (FSDP, DeepSpeed ZeRO-3), gathered from all of them.

    A collective: every process calls it, then the main process saves with it (as the trainer's own save_model does).
    None when every process holds the whole model (one process, DDP, ZeRO-1/2): save the model as it is.
    """
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def quantized_device_map(recipe: Recipe) -> dict[str, Any] | None:
    """Where a 4-bit base loads: each DDP process on its own GPU; None leaves the default (one process, FSDP,
    DeepSpeed: they place the weights themselves)."""
    if world_size() == 1 or recipe.distributed.strategy != "ddp":
        return None
    import torch

    if not torch.cuda.is_available():
        return {"": "cpu"}
    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
