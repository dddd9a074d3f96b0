"""The `--nproc N` launch: `ft train recipe.yaml --nproc N` validates the recipe once, then starts N copies of
`python -m finetune train ...` through `accelerate launch` (torchrun underneath; gloo on CPU, NCCL on GPUs).
`accelerate launch -m finetune train recipe.yaml` with any Accelerate config does the same.

Inside those processes every process builds the same dataset in the same order (the recipe seed), and the trainer's
sampler hands each process its own slice of every global batch (`finetune.distributed.plan`).
"""

from __future__ import annotations

import socket
from typing import Any

from finetune.distributed.process import world_size
from finetune.errors import FinetuneError, RunInterrupted


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


    try:
        launch_command(args)
    except SignalException as e:  # Ctrl-C / SIGTERM reached the launcher: it passed the signal on to the processes
        raise RunInterrupted(f"{nproc}-process training stopped by {e.sigval.name}; the processes saved a checkpoint "
                             "if they could (see above)", exit_code=128 + int(e.sigval)) from None
    except Exception as e:  # torchrun's ChildFailedError, or CalledProcessError: its table names rank and exit code
        failures = getattr(e, "failures", None)
        detail = ""
        if failures:
            rank, first = min(failures.items(), key=lambda item: item[1].timestamp)  # {global rank: ProcessFailure}
            detail = f" (first failure: rank {rank}, exit code {first.exitcode})"
        raise FinetuneError(f"{nproc}-process training failed{detail}; the messages above say why") from None
