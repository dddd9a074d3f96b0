"""How a run is shared between processes: the batch split, the DDP/FSDP/DeepSpeed trainer settings, and what a
machine or launch lacks for them (checked before anything loads).

The global batch is the recipe's micro_batch_size x gradient_accumulation_steps whatever the process count
(`batch_plan`), unless `distributed.keep_global_batch` is false.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.distributed.process import world_size
from finetune.errors import FinetuneError
from finetune.recipe.schema import DistributedConfig, Recipe, TrainingConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are split: processes x micro batch x accumulation steps."""

    processes: int
    micro_batch_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.micro_batch_size * self.accumulation

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = {self.processes} processes x micro batch {self.micro_batch_size} "
                f"x {self.accumulation} accumulation steps")


def batch_plan(training: TrainingConfig, distributed: DistributedConfig, processes: int | None = None) -> BatchPlan:
    """Per-process micro batch and accumulation steps for `processes` processes (default: this run's).

    With `keep_global_batch`, the recipe's micro_batch_size x gradient_accumulation_steps is the global batch: the
    accumulation is divided first (same memory per step), then the micro batch is lowered to the largest divisor
    that fits (less memory, never more). Raises FinetuneError when the processes cannot share the batch evenly.
    """
    n = processes or world_size()
    micro, accum = training.micro_batch_size, training.gradient_accumulation_steps
    if n == 1 or not distributed.keep_global_batch:
        return BatchPlan(n, micro, accum)
    total = micro * accum
    if total % n:
        multiples = sorted({m for m in (total - total % n, total - total % n + n) if m > 0})
        raise FinetuneError(
            f"training: the global batch micro_batch_size x gradient_accumulation_steps = {micro} x {accum} = {total} "
            f"cannot be split evenly over {n} processes; make it a multiple of {n} (e.g. "
            f"{' or '.join(map(str, multiples))}), or set distributed.keep_global_batch: false to run {total} samples "
            f"per process (a global batch of {total * n})"
        )
    per_process = total // n
    micro = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    return BatchPlan(n, micro, per_process // micro)


def deepspeed_settings(distributed: DistributedConfig) -> dict[str, Any] | str:
    """The DeepSpeed config: the recipe's file, or ZeRO at the recipe's stage with `auto` for what the trainer knows."""
    if distributed.deepspeed_config:
        return distributed.deepspeed_config
    return {
        "zero_optimization": {"stage": distributed.deepspeed_stage, "overlap_comm": True,
                              "contiguous_gradients": True,
                              # ZeRO-3: let the adapter be gathered for saving (gathered_state_dict)
                              "stage3_gather_16bit_weights_on_model_save": distributed.deepspeed_stage == 3},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def trainer_distributed_kwargs(recipe: Recipe) -> dict[str, Any]:
    """TrainingArguments keywords for the recipe's strategy (the trainer sets up DDP, FSDP or DeepSpeed from them)."""
    d = recipe.distributed
    if d.strategy == "fsdp":
        fsdp_config = {"version": 2, "reshard_after_forward": d.fsdp_reshard_after_forward,
                       "cpu_offload": d.fsdp_cpu_offload}
        return {"fsdp": True, "fsdp_config": fsdp_config}
    if d.strategy == "deepspeed":
        return {"deepspeed": deepspeed_settings(d)}
    return {"ddp_find_unused_parameters": d.find_unused_parameters}


def environment_problems(recipe: Recipe, processes: int | None = None) -> list[str]:
    """What this machine or launch lacks for the recipe's strategy and batch, each with what to do."""
    d = recipe.distributed
    problems: list[str] = []
    if d.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("distributed.strategy is 'deepspeed' but the deepspeed package is not installed: "
                        "`pip install deepspeed` (it needs a CUDA toolkit matching your torch), or use strategy fsdp")
    if d.deepspeed_config:
        path = Path(d.deepspeed_config)
        if not path.is_file():
            problems.append(f"distributed.deepspeed_config: '{path}' does not exist (resolved against {Path.cwd()})")
        else:
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problems.append(f"distributed.deepspeed_config: '{path}' is not valid JSON ({e})")
    n = processes or world_size()
    if n > 1 and d.strategy != "ddp":  # torch is loaded anyway when several processes are launched
        import torch

        if not torch.cuda.is_available():
            problems.append(f"distributed.strategy '{d.strategy}' needs GPUs: without CUDA, Accelerate would run the "
                            f"{n} processes as plain DDP; use distributed.strategy: ddp on a CPU")
    launched = {"fsdp": os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true",
                "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"}
    for strategy, on in launched.items():
        if on and d.strategy not in (strategy, "ddp"):
            problems.append(f"the Accelerate config of this launch uses {strategy} but distributed.strategy is "
                            f"'{d.strategy}'; use one of them (set distributed.strategy: {strategy}, or launch "
                            "without that Accelerate config)")
    for stage in recipe.effective_stages():
        try:
            batch_plan(recipe.stage_training(stage), d, processes)
        except FinetuneError as e:
            problems.append(f"stage {stage.name}: {e}")
    return problems
