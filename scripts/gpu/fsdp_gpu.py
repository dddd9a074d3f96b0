"""The GPU check's FSDP step: the benchmark's own SFT or DPO recipe with `distributed.strategy: fsdp`, a few steps.

One process on the one GPU, launched the way `ft train --nproc N` launches (`accelerate launch` with the arguments
of `finetune.distributed.launch.accelerate_args`), so Accelerate sets up a process group of one and FSDP2 wraps and
shards the model and gathers the adapter for the save. Checked against the plain (single-process, DDP-equivalent)
benchmark run of the same recipe:

* the loss of each of the first `STEPS` optimizer steps, within `TOLERANCE` (relative). With a cosine schedule and no
  warmup the learning rate of the first update is the peak in both runs whatever their length, so the losses logged
  at steps 1 and 2 are the same computation (step 2 follows one update);
* the distributed type Accelerate chose (FSDP on a GPU; on a CPU Accelerate runs DDP whatever is asked, which the
  rehearsal records);
* the saved adapter: every tensor at its full shape (gathered, not a shard), the same shapes as the plain run's.

`ft validate` runs first with the same overrides: a combination the code refuses is recorded with its reason, and the
next combination of `ATTEMPTS` is tried.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_gpu
import bench_train

STEPS = 2
TOLERANCE = {"gpu": 1e-2, "rehearse": 1e-4}  # relative; bf16 on the GPU, float32 on the CPU
# overrides tried in turn when `ft validate` refuses FSDP with the recipe defaults (the first accepted one runs)
ATTEMPTS = ([], ["data.padding_free=false"])


def fsdp_launch_args(ft_args: list[str]) -> list[str]:
    """`accelerate launch` arguments for one FSDP process: ft's own `--nproc` arguments with `--use_fsdp`.

    `ft train --nproc 1` trains in-process, without a process group, and `accelerate launch --multi_gpu` refuses one
    process; `--use_fsdp` starts torchrun for any count. The FSDP settings themselves come from the recipe
    (`finetune.distributed.plan.trainer_distributed_kwargs`), as with `--nproc N`.
    """
    from finetune.distributed.launch import accelerate_args

    args = accelerate_args(1, ft_args)
    i = args.index("--multi_gpu")
    return [*args[:i], "--use_fsdp", "--fsdp_version", "2", *args[i + 1:]]


def _validate(recipe: Path, sets: list[str], env: dict) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "finetune", "validate", str(recipe), "--quiet",
           *[x for kv in sets for x in ("--set", kv)]]
    done = subprocess.run(cmd, env=env, cwd=bench_train.ROOT, capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def fsdp_run(work: Path, mode: str, rehearse: bool) -> dict:
    """The FSDP run of one mode and its comparison with the plain run; a result for the check's summary."""
    plain = json.loads((work / "results" / f"{mode}-ours.json").read_text())
    if plain.get("status") != "passed":
        return {"status": "skipped", "reason": f"the plain {mode} run did not pass: nothing to compare with"}
    plain_run = plain["figures"]["run"]
    assets = json.loads((work / "assets" / "assets.json").read_text())[mode]
    args, w = bench_gpu.settings(mode, rehearse)
    probe_dir = bench_gpu.write_hook(work)
    dtype = w.get("dtype", "float32")
    refusals = []
    for i, extra in enumerate(ATTEMPTS):
        run = work / "bench" / "runs" / f"{mode}-ours-fsdp{i}"
        run.mkdir(parents=True, exist_ok=True)
        sets = ["distributed.strategy=fsdp", f"quantization.quant_storage={dtype}", *extra]
        cmd = bench_train.ours_command(run, assets, w, STEPS, sets)
        env = bench_train.child_env(run, args.threads, probe_dir)
        ok, said = _validate(run / "recipe.yaml", sets, env)
        if not ok:
            refusals.append({"overrides": sets, "ft validate": said[-2000:]})
            continue
        launch = [sys.executable, "-m", "accelerate.commands.launch", *fsdp_launch_args(cmd[1:])]
        print(f"[fsdp] {' '.join(launch)}", flush=True)
        measured = bench_train.run_measured(launch, env, run / "log.txt")
        break
    else:
        return {"status": "refused", "reason": "ft validate refuses distributed.strategy fsdp with every combination "
                "tried: " + refusals[0]["ft validate"][-300:], "figures": {"refusals": refusals}}
    log_tail = (run / "log.txt").read_text(errors="replace").splitlines()[-30:]
    figures: dict = {"overrides": sets, "refusals": refusals, "command": " ".join(launch), **measured}
    if measured["exit_code"] != 0:
        return {"status": "failed", "reason": f"the FSDP run exited with {measured['exit_code']}",
                "figures": figures, "log_tail": log_tail}
    probe = json.loads((run / "probe.json").read_text())
    fsdp_losses = [loss for _, loss in probe["losses"][:STEPS]]
    base_losses = first_losses(plain_run, STEPS)
    records = bench_gpu.process_records(run)
    trainer = [r for r in records if r.get("distributed_type")]
    figures.update(losses=fsdp_losses, plain_losses=base_losses, processes=records,
                   peak_gpu_bytes=bench_gpu.peak_gpu_bytes(run))
    tolerance = TOLERANCE["rehearse" if rehearse else "gpu"]
    problems = []
    if len(fsdp_losses) < STEPS or len(base_losses) < STEPS:
        problems.append(f"fewer than {STEPS} logged losses (FSDP {fsdp_losses}, plain {base_losses})")
    else:
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fsdp_losses, base_losses, strict=True))
        figures.update(max_relative_loss_difference=rel, tolerance=tolerance)
        if rel > tolerance:
            problems.append(f"loss differs from the plain run's by {rel:.3g} (relative), over {tolerance}")
    kinds = sorted({r["distributed_type"] for r in trainer})
    figures["distributed_type"] = kinds
    if not rehearse and kinds != ["DistributedType.FSDP"]:
        problems.append(f"Accelerate ran {kinds or 'no trainer'}, not FSDP")
    try:
        shapes, expected = adapter_shapes(run), adapter_shapes(Path(plain_run["run_dir"]))
        figures["adapter_tensors"] = len(shapes)
        if shapes != expected:
            problems.append("the saved adapter's tensor shapes differ from the plain run's (a shard saved?)")
    except ValueError:  # no adapter, or more than one
        problems.append("no adapter saved")
    if problems:
        return {"status": "failed", "reason": "; ".join(problems), "figures": figures, "log_tail": log_tail}
    note = "" if not rehearse else f"; on the CPU Accelerate ran {kinds} (FSDP needs GPUs)"
    return {"status": "passed", "reason": f"{STEPS} steps, losses within {tolerance} of the plain run's{note}",
            "figures": figures}


def first_losses(run: dict, n: int) -> list[float]:
    """The first `n` logged losses of a run (one per optimizer step: the benchmark logs every step)."""
    return [loss for _, loss in run["probe"]["losses"][:n]]


def adapter_shapes(run_dir: Path) -> dict[str, list[int]]:
    """Tensor shapes of the adapter a run saved (found under its output folder)."""
    from safetensors import safe_open

    (path,) = sorted((run_dir / "out").glob("*/adapter/adapter_model.safetensors"))
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
