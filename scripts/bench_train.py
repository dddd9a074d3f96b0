"""Benchmark `ft train` against the TRL CLI (`trl sft`) on the same work, side by side, and report MFU.

    .venv/bin/python scripts/bench_train.py                       # full size: ~38M Llama, 32k vocab, 3 repetitions
    .venv/bin/python scripts/bench_train.py --preset tiny --reps 1 --sides ours,trl-default   # smoke run

Every side is its own process, started from the shell command a user would type (`ft train recipe.yaml`,
`trl sft --config trl.yaml`), in alternating order, `--reps` times; medians are reported. Same work on every side:
the same random 4-bit NF4 base (double quantization, float32 compute), LoRA rank/alpha/targets, learning rate and
schedule, max length, samples per optimizer step, number of samples (one epoch), seed, and loss on assistant tokens
only (the probe counts the label tokens each side trained on, so a mismatch shows up in the table).

Sides: `ours` (ft with recipe defaults), `trl-default` (trl sft defaults: bf16 autocast, gradient checkpointing,
padded batches), `trl-best` (its fastest flags that run here: no bf16 autocast, no gradient checkpointing,
padding-free batches), `trl-packed` (`--packing`, best-fit-decreasing bins of max_length; rows per step instead of
samples per step, so it is reported but never called "same work").

Measured per run (see `bench_probe.py` for the probe and the FLOPs formula): real tokens/s (non-padding tokens the
model consumed / time from train begin to last optimizer step), wall time of the command, time to first optimizer
step (from launch), peak RSS (largest single process, from wait4; and the whole process tree, sampled), final train
loss (mean of the last quarter of steps) and held-out loss (assistant tokens of held-out rows, computed by this
script the same way for every side's saved adapter, first repetition). MFU against the float32 and bfloat16 matmul
peaks measured here, with the same thread count, before and after the runs. The held-out loss of the untrained model
and of `ours` trained with `--noise-seeds` other data orders (the sides shuffle differently) say how much of a
held-out difference is noise.

`--preset moe` (a Qwen3-MoE-like model, 8 experts, top-2): ours keeps the experts in NF4 too
(`quantization.experts: true`), trl keeps them in float32 (bitsandbytes quantizes linear layers only); LoRA on the
attention layers on every side (`lora.experts: none`), named explicitly, since peft's `all-linear` on trl's side would
also adapt every expert. Its report is moe.md:

    .venv/bin/python scripts/bench_train.py --preset moe --reps 1 --threads 1 --sides ours,trl-best

Outputs in --out (default bench/): sft.json, sft.md, sft.png (or the --mode / --tag stem). `--mode kto` and `--mode
grpo` run `bench_align.py` (against `trl kto` / `trl grpo`; GRPO with completions/s and its time by phase).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_heldout  # noqa: E402
from bench_assets import PRESETS, build_assets  # noqa: E402
from bench_proc import child_env, run_measured, write_probe_hook  # noqa: E402
from bench_report import summarize, write_reports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("FT_BENCH_BIN") or Path(sys.executable).parent)  # where `ft` and `trl` are
SIDES = ("ours", "trl-default", "trl-best", "trl-packed")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # the LoRA targets of the MoE presets, on every side
TRL_FLAGS = {
    "sft": {
        "trl-default": {},
        "trl-best": {"bf16": False, "gradient_checkpointing": False, "padding_free": True, "max_length": None},
        "trl-packed": {"bf16": False, "gradient_checkpointing": False, "packing": True, "packing_strategy": "bfd"},
    },
    "dpo": {  # trl 1.16 disables DPO padding_free ("temporarily unavailable"), so it is no flag to try
        "trl-default": {},
        "trl-best": {"bf16": False, "gradient_checkpointing": False},
        "trl-packed": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
    },
}


def work_settings(args: argparse.Namespace) -> dict:
    """The settings that define the work, identical on every side."""
    w = {"mode": args.mode, "max_length": PRESETS[args.preset].max_len, "micro_batch": args.micro_batch,
         "grad_accum": args.grad_accum, "lr": 2e-4, "scheduler": "cosine", "lora_r": 16, "lora_alpha": 32,
         "lora_dropout": 0.0, "targets": "all-linear", "seed": 42, "epochs": 1, "optimizer": "adamw_torch"}
    if args.mode == "dpo":
        w.update(lr=5e-5, beta=0.1, loss="sigmoid", reference="base (adapter disabled)")
    if PRESETS[args.preset].experts:
        w.update(targets=list(ATTENTION), experts="NF4 on ours (quantization.experts), float32 on trl (bitsandbytes "
                 "quantizes linear layers only); no adapters on the experts or the router")
    return w


def ours_command(run: Path, assets: dict, w: dict, max_steps: int | None, extra: list[str]) -> list[str]:
    train = {"epochs": w["epochs"], "micro_batch_size": w["micro_batch"],
             "gradient_accumulation_steps": w["grad_accum"], "learning_rate": w["lr"], "lr_scheduler": w["scheduler"],
             "seed": w["seed"], "logging_steps": 1, "optimizer": w["optimizer"]}
    if max_steps:
        train["max_steps"] = max_steps
    recipe = {
        "name": "bench",
        "model": {"name_or_path": assets["model"], "dtype": w.get("dtype", "float32")},
        "quantization": {"mode": "nf4", "double_quant": True, "compute_dtype": w.get("dtype", "float32"),
                         **({"experts": True} if "experts" in w else {})},
        "lora": {"r": w["lora_r"], "alpha": w["lora_alpha"], "dropout": w["lora_dropout"],
                 "target_modules": w["targets"]},
        "data": {"train": [{"path": assets["train"]}], "max_length": w["max_length"], "train_on": "assistant",
                 "cache_dir": str(run / "data-cache")},  # fresh per run, like trl's datasets cache below
        "training": train,
        "output": {"dir": str(run / "out"), "overwrite": True},
    }
    if w["mode"] == "dpo":  # one DPO stage on a fresh adapter, the base as reference (what `trl dpo --use_peft` does)
        recipe["stages"] = [{"name": "dpo", "kind": "dpo", "init_from": "new",
                             "dpo": {"beta": w["beta"], "loss_type": w["loss"], "reference": "base"}}]
    path = run / "recipe.yaml"
    path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    return [str(BIN / "ft"), "train", str(path), *[x for kv in extra for x in ("--set", kv)]]


def trl_command(side: str, run: Path, assets: dict, w: dict, max_steps: int | None) -> list[str]:
    cfg = {
        "model_name_or_path": assets["model"], "dataset_name": assets["train_dir"], "output_dir": str(run / "out"),
        "dtype": w.get("dtype", "float32"), "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "use_bnb_nested_quant": True,
        "use_peft": True, "lora_r": w["lora_r"], "lora_alpha": w["lora_alpha"], "lora_dropout": w["lora_dropout"],
        "lora_target_modules": [w["targets"]] if isinstance(w["targets"], str) else w["targets"],
        "max_length": w["max_length"],
        "per_device_train_batch_size": w["micro_batch"], "gradient_accumulation_steps": w["grad_accum"],
        "learning_rate": w["lr"], "lr_scheduler_type": w["scheduler"], "num_train_epochs": w["epochs"],
        "seed": w["seed"], "logging_steps": 1, "save_strategy": "no", "report_to": "none", "optim": w["optimizer"],
        "dataloader_num_workers": 0, "disable_tqdm": True,
        # without use_cpu trl's default bf16=True refuses to start on a machine without a GPU; a GPU profile
        # (scripts/gpu/bench_gpu.py) sets dtype, use_cpu and the flags of each side in the work settings
        "use_cpu": w.get("use_cpu", True),
        **w.get("trl_flags", TRL_FLAGS[w["mode"]])[side],
    }
    if w["mode"] == "sft":
        cfg["assistant_only_loss"] = True
    else:
        cfg.update(beta=w["beta"], loss_type=[w["loss"]])
    if max_steps:
        cfg["max_steps"] = max_steps
    path = run / "trl.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    return [str(BIN / "trl"), w["mode"], "--config", str(path)]


def adapter_dir(side: str, run: Path, mode: str) -> Path:
    return run / "out" / mode / "adapter" if side == "ours" else run / "out"


def heldout(side: str, run: Path, assets: dict, w: dict, threads: int) -> dict:
    adapter = adapter_dir(side, run, w["mode"])
    if w["mode"] == "dpo":
        return bench_heldout.dpo_loss(assets["model"], adapter, assets["eval"], threads, w["beta"])
    return bench_heldout.sft_loss(assets["model"], adapter, assets["eval"], threads)


def run_one(side: str, rep: int, args: argparse.Namespace, assets: dict, w: dict, probe_dir: Path,
            label: str | None = None) -> dict:
    run = Path(args.work) / "runs" / f"{args.mode}-{side}-{label or rep}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cap = args.cap.get(side)
    cmd = (ours_command(run, assets, w, cap, args.ours_set) if side == "ours"
           else trl_command(side, run, assets, w, cap))
    print(f"[bench] {side} rep {rep}: {' '.join(cmd)}", flush=True)
    m = run_measured(cmd, child_env(run, args.threads, probe_dir), run / "log.txt")
    probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").exists() else {}
    result = {"side": side, "rep": rep, "run_dir": str(run), "capped_steps": cap, **m, "probe": probe}
    if m["exit_code"] != 0 or not probe.get("steps"):
        tail = (run / "log.txt").read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"[bench] {side} rep {rep} failed (exit {m['exit_code']}); log {run / 'log.txt'}:\n"
                         + "\n".join(tail))
    steps = probe["steps"]
    result["train_seconds"] = steps[-1][1] - probe["train_begin"]
    result["time_to_first_step"] = steps[0][1] - m["t_launch"]
    result["tokens_per_second"] = probe["tokens_real"] / result["train_seconds"]
    result["pairs_per_second"] = probe["rows"] / 2 / result["train_seconds"]  # DPO rows: chosen and rejected
    losses = [loss for _, loss in probe["losses"]]
    result["final_train_loss"] = statistics.fmean(losses[-max(1, len(losses) // 4):]) if losses else None
    print(f"[bench] {side} rep {rep}: {result['tokens_per_second']:.1f} tok/s, wall {m['wall_seconds']:.1f}s, "
          f"first step {result['time_to_first_step']:.1f}s, peak RSS {m['peak_rss_mb']:.0f} MB "
          f"(tree {m['tree_peak_rss_mb']:.0f} MB), final loss {result['final_train_loss']}", flush=True)
    return result


def matmul_peaks(threads: int, budget: float) -> dict:
    import torch
    from bench_probe import measure_matmul_peak

    torch.set_num_threads(threads)
    return {"float32": measure_matmul_peak("float32", budget_seconds=budget),
            "bfloat16": measure_matmul_peak("bfloat16", sizes=(256, 512), repeats=1, budget_seconds=budget / 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("sft", "dpo", "kto", "grpo"), default="sft",
                    help="vs `trl sft`, `trl dpo`, `trl kto`, `trl grpo` (kto, grpo: see bench_align.py)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--samples", type=int, default=None, help="training samples (default: the preset's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sides", default="ours,trl-default,trl-best", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (the cores are shared)")
    ap.add_argument("--micro-batch", type=int, default=None, help="samples (pairs) per micro-batch: 4 (sft), 2 (dpo)")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--cap", action="append", default=[], metavar="SIDE=STEPS",
                    help="stop a (slow) side after STEPS optimizer steps; its losses are then not compared")
    ap.add_argument("--once", default="", help="comma list of (slow) sides run in the first repetition only")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `ft train --set` override for the ours side (to measure an option)")
    ap.add_argument("--peak-budget", type=float, default=20.0, help="seconds per matmul-peak measurement")
    ap.add_argument("--no-heldout", action="store_true", help="skip the held-out loss evaluation")
    ap.add_argument("--noise-seeds", type=int, default=2,
                    help="extra ours runs with other data-order seeds: the held-out loss spread 'no worse' allows")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work"), help="assets and run folders")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="where sft.json / .md / .png go")
    ap.add_argument("--tag", default=None, help="output file stem (default: the mode; moe for the moe presets)")
    ap.add_argument("--note", default=None, help="a sentence for the report (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in args.sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown side(s) {unknown}; choose from {SIDES}")
    args.cap = {k: int(v) for k, v in (c.split("=", 1) for c in args.cap)}
    args.once = [s.strip() for s in args.once.split(",") if s.strip()]
    args.micro_batch = args.micro_batch or {"dpo": 2, "grpo": 8}.get(args.mode, 4)  # grpo: completions
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.tag = args.tag or ("moe" if PRESETS[args.preset].experts and args.mode == "sft" else args.mode)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.mode in ("kto", "grpo"):
        import bench_align

        return bench_align.main(args)
    work = Path(args.work)
    assets = build_assets(work / f"assets-{args.mode}-{args.preset}", args.preset, train_samples=args.samples,
                          mode=args.mode)
    w = work_settings(args)
    probe_dir = write_probe_hook(work)
    load_before = os.getloadavg()
    peaks = [matmul_peaks(args.threads, args.peak_budget)]
    runs = []
    for rep in range(args.reps):
        order = args.sides[rep % len(args.sides):] + args.sides[: rep % len(args.sides)]  # rotate: no fixed slot
        for side in order:
            if rep > 0 and side in args.once:
                continue
            result = run_one(side, rep, args, assets, w, probe_dir)
            if rep == 0 and not args.no_heldout:
                result.update(heldout(side, Path(result["run_dir"]), assets, w, args.threads))
                print(f"[bench] {side}: held-out {json.dumps({k: v for k, v in result.items() if 'heldout' in k})}",
                      flush=True)
            runs.append(result)
    heldout_noise = []
    if "ours" in args.sides and not args.no_heldout:
        # How much the held-out loss moves with the data order alone: ours again with other shuffling seeds. The
        # sides shuffle differently, so "no worse" is judged against this spread.
        first = next(r for r in runs if r["side"] == "ours")
        heldout_noise.append({"seed": w["seed"], **{k: v for k, v in first.items() if k.startswith("heldout")}})
        for i in range(1, args.noise_seeds + 1):
            wk = {**w, "seed": w["seed"] + i}
            result = run_one("ours", 0, args, assets, wk, probe_dir, label=f"seed{wk['seed']}")
            heldout_noise.append({"seed": wk["seed"], **heldout("ours", Path(result["run_dir"]), assets, wk,
                                                                 args.threads)})
            print(f"[bench] ours, seed {wk['seed']}: held-out {heldout_noise[-1]}", flush=True)
    heldout_before = (bench_heldout.untrained(args.mode, assets["model"], assets["eval"], args.threads)
                      if not args.no_heldout else None)
    peaks.append(matmul_peaks(args.threads, args.peak_budget))
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
            "mode": args.mode, "preset": args.preset, "work": w, "threads": args.threads, "reps": args.reps,
            "sides": args.sides, "caps": args.cap, "once": args.once, "ours_set": args.ours_set, "assets": assets,
            "load_average": {"before": load_before, "after": os.getloadavg()}, "cpus": os.cpu_count(),
            "heldout_noise": heldout_noise, "heldout_before": heldout_before, "note": args.note,
            "moe": bool(PRESETS[args.preset].experts)}
    summary = summarize(runs, peaks, assets, w, meta)
    write_reports(summary, Path(args.out), args.tag)
    return summary


if __name__ == "__main__":
    main()
