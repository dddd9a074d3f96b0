"""Several processes: the `--nproc N` launch through Accelerate, who writes, how the batch is split, DDP/FSDP/DeepSpeed.

`ft train recipe.yaml --nproc N` validates the recipe once, then starts N copies of `python -m finetune train ...`
through `accelerate launch` (torchrun underneath; gloo on CPU, NCCL on GPUs). `accelerate launch -m finetune train
recipe.yaml` with any Accelerate config does the same. Inside those processes:

- only the main process (global rank 0) writes the run folder, logs and uploads (`is_main_process`), and the others
  wait for it where they read what it wrote (`wait_for_everyone`);
- every process builds the same dataset in the same order (the recipe seed), and the trainer's sampler hands each
  process its own slice of every global batch;
- the global batch is the recipe's micro_batch_size x gradient_accumulation_steps whatever the process count
  (`batch_plan`), unless `distributed.keep_global_batch` is false.

Nothing here imports torch at module level, so `ft --help` and `ft validate` stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe import DistributedConfig, Recipe, TrainingConfig

# --------------------------------------------------------------------------------------------------------------
# Which process am I?


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


# --------------------------------------------------------------------------------------------------------------
# The batch


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


# --------------------------------------------------------------------------------------------------------------
# DDP / FSDP / DeepSpeed settings for the trainer


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


# --------------------------------------------------------------------------------------------------------------
# Launching N processes


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes to meet (the default 29500 may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_args(nproc: int, ft_args: list[str], port: int | None = None) -> list[str]:
    """Arguments of `accelerate launch` that run `python -m finetune <ft_args>` in `nproc` processes on this machine.

    `--multi_gpu` selects Accelerate's torchrun launcher, which also serves CPU-only machines (each process then uses
    the gloo backend); `--cpu` would start a single process. Precision and the DDP/FSDP/DeepSpeed settings come from
    the recipe through the trainer, so no Accelerate config file is read.
    """
    return ["--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "finetune", *ft_args]


def check_nproc(nproc: int) -> None:
    """Refuse a process count this machine cannot run, or a second launch from inside a launched process."""
    if nproc < 1:
        raise FinetuneError(f"--nproc {nproc}: give 1 or more processes")
    if world_size() > 1:
        raise FinetuneError(f"--nproc: this process was already started by a launcher ({world_size()} processes); "
                            "drop --nproc")
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise FinetuneError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) are visible; one process per "
                            "GPU (set CUDA_VISIBLE_DEVICES to choose them)")


def command_line(ctx: Any, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The arguments of a running `ft` command rebuilt from what it parsed, minus `drop`: what each process runs.

    Rebuilt from the parsed values rather than copied from sys.argv, so it is right whatever the caller (a shell,
    the Python API, a test runner) and forwards options added to the command later without a change here.
    """
    out = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None:
            continue
        if param.param_type_name == "argument":
            out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif getattr(param, "is_flag", False):
            flag = param.opts[0] if value else next(iter(param.secondary_opts), None)
            if value != param.default and flag:
                out.append(flag)
        elif getattr(param, "multiple", False):
            for item in value:
                out += [param.opts[0], str(item)]
        else:
            out += [param.opts[0], str(value)]
    return out


def relaunch(nproc: int, ft_args: list[str]) -> None:
    """Run `ft <ft_args>` in `nproc` processes through Accelerate and wait for them.

    Raises:
        FinetuneError: when a process fails (its own message is printed above by that process).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    check_nproc(nproc)
    argv = accelerate_args(nproc, ft_args)
    print(f"launching {nproc} processes: accelerate launch {' '.join(argv)}", flush=True)
    args = launch_command_parser().parse_args(argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from finetune.guards import RunInterrupted

    try:
        launch_command(args)
    except SignalException as e:  # Ctrl-C / SIGTERM reached the launcher: it passed the signal on to the processes
        raise RunInterrupted(f"{nproc}-process training stopped by {e.sigval.name}; the processes saved a checkpoint "
                             "if they could (see above)", exit_code=128 + int(e.sigval)) from None
    except Exception as e:  # torchrun's ChildFailedError, or CalledProcessError: its table names rank and exit code
        failures = getattr(e, "failures", None)
        detail = ""
        if failures:
            first = min(failures.values(), key=lambda f: f.timestamp)
            detail = f" (first failure: rank {first.global_rank}, exit code {first.exitcode})"
        raise FinetuneError(f"{nproc}-process training failed{detail}; the messages above say why") from None
