"""`scripts/bench_train.py --mode kto|grpo`: a kto or grpo stage of `ft train` against `trl kto` / `trl grpo`.

    .venv/bin/python scripts/bench_train.py --mode grpo --samples 16 --reps 2
    .venv/bin/python scripts/bench_train.py --mode kto --samples 32 --reps 2

Same machinery as the SFT and DPO benchmark (`bench_train.py`): each side is its own process started from the command a
user would type, alternating, medians over `--reps`; the probe (`bench_probe.py`) records the optimizer steps and,
for GRPO, the time trl's own profiler measures for each phase. Same work on every side: the benchmark's random 4-bit
NF4 Llama, LoRA r16 on all linear layers, one fresh adapter, the base with the adapter disabled as the reference,
learning rate and schedule, samples per step, one epoch, seed.

* kto: the benchmark's preference pairs, which both tools split into a desirable and an undesirable row each.
* grpo: the pairs' prompts, `num_generations` completions each of exactly `max_completion_length` tokens (a random
  model rarely samples its end token, so every side generates the same number of tokens; checked in the table), an
  exact-match reward against the pair's first chosen word (ours: the built-in `exact_match`; trl: the same function
  through `--reward_funcs bench_align.trl_exact_match`), KL weight beta so the reference forward runs.

GRPO's time is split into generation (`transformers.generate`), scoring (the reward functions), the log-prob forwards
before the loss (the reference policy, tokenizing, padding) and the training step (loss forward, backward, optimizer).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

MODES = ("kto", "grpo")
TRL_FLAGS = {  # trl's defaults for these trainers: bf16 autocast and gradient checkpointing on
    "trl-default": {},
    "trl-best": {"bf16": False, "gradient_checkpointing": False},
}


def settings(args) -> dict:
    """The work, identical on every side."""
    w = {"mode": args.mode, "max_length": 256 if args.mode == "grpo" else 1024, "micro_batch": args.micro_batch,
         "grad_accum": args.grad_accum, "lr": 5e-5, "scheduler": "cosine", "lora_r": 16, "lora_alpha": 32,
         "lora_dropout": 0.0, "targets": "all-linear", "seed": 42, "epochs": 1, "optimizer": "adamw_torch",
         "reference": "base (adapter disabled)"}
    if args.mode == "kto":
        w.update(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    else:
        w.update(num_generations=4, max_completion_length=32, temperature=1.0, beta=0.04, reward="exact_match")
    return w


def grpo_prompts(assets: dict) -> dict:
    """Prompts (with the reference answer: the chosen answer's first word) from the benchmark's pairs."""
    src = Path(assets["train"])
    out = src.parent.parent / "grpo-train" / "train.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with src.open() as f, out.open("w") as g:
        for line in f:
            row = json.loads(line)
            g.write(json.dumps({"prompt": row["prompt"], "answer": row["chosen"][0]["content"].split()[0]}) + "\n")
    return {**assets, "train": str(out), "train_dir": str(out.parent)}


def trl_exact_match(completions, answer, **_):
    """trl's side of the reward: our built-in exact match on the completions' text."""
    from finetune.stages.rewards import exact_match

    return exact_match([c[-1]["content"] if isinstance(c, list) else c for c in completions], answer)


def ours_recipe(run: Path, assets: dict, w: dict) -> dict:
    train = {"epochs": w["epochs"], "micro_batch_size": w["micro_batch"],
             "gradient_accumulation_steps": w["grad_accum"], "learning_rate": w["lr"], "lr_scheduler": w["scheduler"],
             "seed": w["seed"], "logging_steps": 1, "optimizer": w["optimizer"]}
    if w["mode"] == "kto":
        stage = {"name": "kto", "kind": "kto", "init_from": "new",
                 "kto": {"beta": w["beta"], "reference": "base", "desirable_weight": w["desirable_weight"],
                         "undesirable_weight": w["undesirable_weight"]}}
        source = {"path": assets["train"], "format": "preference"}
    else:
        stage = {"name": "grpo", "kind": "grpo", "init_from": "new",
                 "grpo": {"num_generations": w["num_generations"], "max_completion_length": w["max_completion_length"],
                          "temperature": w["temperature"], "beta": w["beta"], "reference": "base",
                          "rewards": [{"kind": "exact_match"}]}}
        source = {"path": assets["train"], "format": "prompts"}
    return {
        "name": "bench",
        "model": {"name_or_path": assets["model"], "dtype": "float32"},
        "quantization": {"mode": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "lora": {"r": w["lora_r"], "alpha": w["lora_alpha"], "dropout": w["lora_dropout"],
                 "target_modules": w["targets"]},
        "data": {"train": [source], "max_length": w["max_length"], "cache_dir": str(run / "data-cache")},
        "training": train,
        "stages": [stage],
        "output": {"dir": str(run / "out"), "overwrite": True},
    }


def trl_config(side: str, run: Path, assets: dict, w: dict) -> dict:
    cfg = {
        "model_name_or_path": assets["model"], "dataset_name": assets["train_dir"], "output_dir": str(run / "out"),
        "dtype": "float32", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
        "use_peft": True, "lora_r": w["lora_r"], "lora_alpha": w["lora_alpha"], "lora_dropout": w["lora_dropout"],
        "lora_target_modules": [w["targets"]], "per_device_train_batch_size": w["micro_batch"],
        "gradient_accumulation_steps": w["grad_accum"], "learning_rate": w["lr"], "lr_scheduler_type": w["scheduler"],
        "num_train_epochs": w["epochs"], "seed": w["seed"], "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "optim": w["optimizer"], "dataloader_num_workers": 0, "disable_tqdm": True,
        "use_cpu": True, "beta": w["beta"], **TRL_FLAGS[side],
    }
    if w["mode"] == "kto":
        cfg.update(max_length=w["max_length"], desirable_weight=w["desirable_weight"],
                   undesirable_weight=w["undesirable_weight"])
    else:
        cfg.update(num_generations=w["num_generations"], max_completion_length=w["max_completion_length"],
                   temperature=w["temperature"], reward_funcs=["bench_align.trl_exact_match"])
    return cfg


def phases(probe: dict, train_seconds: float) -> dict:
    """GRPO's time by phase, in seconds, from trl's profiler (see the module docstring)."""
    def phase(name: str) -> float:  # trl names them `<trainer class>.<name>`
        return sum(v[0] for k, v in probe.get("phases", {}).items() if k.endswith(f".{name}"))

    gen, score, prepare = phase("transformers.generate"), phase("_calculate_rewards"), phase("_prepare_inputs")
    return {"generation": gen, "scoring": score, "logprob_forwards": max(prepare - gen - score, 0.0),
            "train_step": max(train_seconds - prepare, 0.0)}


def measure(result: dict, w: dict) -> dict:
    """The figures of one run (completions/s, tokens, phases) from its probe."""
    probe = result["probe"]
    steps = probe["steps"]
    seconds = steps[-1][1] - probe["train_begin"]
    out = {"train_seconds": seconds, "time_to_first_step": steps[0][1] - result["t_launch"], "steps": len(steps)}
    losses = [loss for _, loss in probe["losses"]]
    out["final_train_loss"] = statistics.fmean(losses[-max(1, len(losses) // 4):]) if losses else None
    if w["mode"] == "kto":
        out["rows"] = probe["rows"]  # desirable + undesirable rows trained (the KL batch beside them not counted)
        out["rows_per_second"] = probe["rows"] / seconds
        return out
    logs = probe.get("logs", [])
    completions = len(steps) * w["micro_batch"] * w["grad_accum"]
    lengths = [r["completions/mean_length"] for r in logs if "completions/mean_length" in r]
    out.update(completions=completions, completions_per_second=completions / seconds,
               mean_completion_length=statistics.fmean(lengths) if lengths else None)
    if out["mean_completion_length"] is not None:
        out["completion_tokens_per_second"] = out["completions_per_second"] * out["mean_completion_length"]
    out["phases"] = phases(probe, seconds)
    return out


def command(side: str, run: Path, assets: dict, w: dict, extra: list[str], bin_dir: Path) -> list[str]:
    if side == "ours":
        path = run / "recipe.yaml"
        path.write_text(json.dumps(ours_recipe(run, assets, w), indent=1))  # JSON is YAML
        return [str(bin_dir / "ft"), "train", str(path), *[x for kv in extra for x in ("--set", kv)]]
    path = run / "trl.yaml"
    path.write_text(json.dumps(trl_config(side, run, assets, w), indent=1))
    return [str(bin_dir / "trl"), w["mode"], "--config", str(path)]


def main(args) -> dict:
    """Run the sides, write `<out>/<tag>.json` and `.md`, return the summary."""
    import os
    import shutil

    import bench_proc as bp
    from bench_assets import build_assets
    from bench_train import BIN

    bad = [s for s in args.sides if s != "ours" and s not in TRL_FLAGS]
    if bad:
        raise SystemExit(f"[bench] sides {bad} have no {args.mode} flags; choose from ours, {', '.join(TRL_FLAGS)}")
    work = Path(args.work)
    assets = build_assets(work / f"assets-dpo-{args.preset}", args.preset, train_samples=args.samples, mode="dpo")
    if args.mode == "grpo":
        assets = grpo_prompts(assets)
    w = settings(args)
    probe_dir = bp.write_probe_hook(work)
    load_before = os.getloadavg()
    runs = []
    for rep in range(args.reps):
        for side in args.sides[rep % len(args.sides):] + args.sides[: rep % len(args.sides)]:
            if rep > 0 and side in args.once:
                continue
            run = work / "runs" / f"{args.mode}-{side}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            cmd = command(side, run, assets, w, args.ours_set, BIN)
            env = bp.child_env(run, args.threads, probe_dir)
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env["PYTHONPATH"]])
            print(f"[bench] {side} rep {rep}: {' '.join(cmd)}", flush=True)
            m = bp.run_measured(cmd, env, run / "log.txt")
            probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").exists() else {}
            if m["exit_code"] != 0 or not probe.get("steps"):
                tail = (run / "log.txt").read_text(errors="replace").splitlines()[-25:]
                raise SystemExit(f"[bench] {side} rep {rep} failed (exit {m['exit_code']}); log {run / 'log.txt'}:\n"
                                 + "\n".join(tail))
            result = {"side": side, "rep": rep, "run_dir": str(run), **m, "probe": probe}
            result.update(measure(result, w))
            print(f"[bench] {side} rep {rep}: " + json.dumps({k: v for k, v in result.items()
                                                              if k not in ("probe", "run_dir")}), flush=True)
            runs.append(result)
    meta = {"command": "python scripts/bench_train.py " + " ".join(args.argv), "mode": args.mode,
            "preset": args.preset, "work": w, "threads": args.threads, "reps": args.reps, "sides": args.sides,
            "once": args.once, "ours_set": args.ours_set, "samples": args.samples, "cpus": os.cpu_count(),
            "load_average": {"before": load_before, "after": os.getloadavg()}}
    summary = {"meta": meta, "runs": [{k: v for k, v in r.items() if k != "probe"} for r in runs]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1))
    from bench_align_report import markdown

    (out / f"{args.tag}.md").write_text(markdown(summary))
    print((out / f"{args.tag}.md").read_text())
    return summary
