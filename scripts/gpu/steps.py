"""The GPU check's steps, one per process: `python scripts/gpu/steps.py --work WORK [--rehearse] NAME`.

Each step writes `WORK/results/NAME.json`: `status` (passed, failed, skipped, refused), `reason` (one line) and
`figures`. `check.py` runs them in order, with a time budget each, and builds the summary from these files.

    env           package versions and where each is imported from, CUDA, the bitsandbytes library it loaded
    kernel-tests  the trimmed selection of tests/gpu (plan.KERNEL_SELECTION; also writes nf4-bit-exact)
    gpu-tests     tests/gpu in full, in its own pytest process (each test's result written as it finishes)
    matmul-peak   bf16 and fp32 matmul FLOP/s of the device (the MFU denominator)
    assets        the model, tokenizer and data (bench_gpu.build_assets)
    sft-ours, sft-trl-best, dpo-ours, dpo-trl-best     one training run each (bench_gpu.run_side)
    sft-compare, dpo-compare                           side by side (bench_gpu.compare)
    dry-run       `ft train --dry-run` of the SFT and DPO recipes (the function the command calls)
    memory        the dry run's estimate against the measured peak GPU memory
    export        `ft export --format merged` of the SFT run (verified by ft export itself)
    fsdp-sft, fsdp-dpo                                 fsdp_gpu.fsdp_run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (HERE, HERE.parent):  # not ROOT: finetune comes from PYTHONPATH (check.py's project_overlay)
    sys.path.insert(0, str(_p))
import bench_gpu  # noqa: E402
from envcheck import step_env  # noqa: E402


def _result(work: Path, name: str, result: dict) -> None:
    path = work / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))


def _load(work: Path, name: str) -> dict:
    path = work / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "missing"}


def step_gpu_tests(work: Path, rehearse: bool, name: str = "gpu-tests", selection: str | None = None) -> dict:
    """tests/gpu (or the `-k` selection) in a pytest process of its own; each test's result is written as it
    finishes (live_results.py) and pytest is stopped before the check's limit for this step, so what finished is
    reported either way."""
    import live_results

    report = work / "results" / f"{name}.jsonl"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "live_results", "-m", "gpu",
           "tests/gpu", "-rs", *(["-k", selection] if selection else [])]
    limit = float(os.environ.get("FT_STEP_SECONDS") or 3600)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "FT_TEST_RESULTS": str(report)},
                            start_new_session=True)
    try:
        code = proc.wait(timeout=max(limit - 15, limit * 0.8))
    except subprocess.TimeoutExpired:  # stop it before the check kills this step: the results so far still count
        os.killpg(proc.pid, 9)
        proc.wait()
        code = None
    cases = live_results.read(report)

    def verdict(subset: list[dict], what: str) -> dict:
        counts = {k: sum(c["outcome"] == k for c in subset) for k in ("passed", "failed", "error", "skipped")}
        bad = [f"{c['name']}: {c['message']}" for c in subset if c["outcome"] in ("failed", "error")]
        figures = {"counts": counts, "failed": bad, "slowest": sorted(subset, key=lambda c: -c["seconds"])[:3],
                   "pytest_exit_code": code}
        stopped = f"; pytest stopped at the step's limit after {len(subset)} {what}" if code is None else ""
        if not subset:
            return {"status": "failed", "reason": f"no {what} finished (pytest exit code {code}){stopped}",
                    "figures": figures}
        if bad:
            return {"status": "failed", "reason": f"{len(bad)} of {len(subset)} {what} failed{stopped}",
                    "figures": figures}
        if code is None:
            return {"status": "failed", "reason": f"{counts['passed']} {what} passed{stopped}", "figures": figures}
        if counts["skipped"] == len(subset):
            reasons = sorted({c["message"] for c in subset})
            return {"status": "skipped", "reason": f"all {len(subset)} {what} skipped: {'; '.join(reasons)}",
                    "figures": figures}
        return {"status": "passed", "reason": f"{counts['passed']} {what} passed, {counts['skipped']} skipped",
                "figures": figures}

    if selection:  # the trimmed run holds the NF4 bit-exact tests: their own row of the summary
        _result(work, "nf4-bit-exact", verdict([c for c in cases if "bit_exact" in c["name"]], "NF4 bit-exact tests"))
    return verdict(cases, "GPU tests")


def step_matmul(work: Path, rehearse: bool) -> dict:
    import torch

    if rehearse:
        from bench_probe import measure_matmul_peak

        peaks = {"float32": measure_matmul_peak("float32", sizes=(256, 512), budget_seconds=3),
                 "bfloat16": measure_matmul_peak("bfloat16", sizes=(256,), repeats=1, budget_seconds=3)}
    else:
        peaks = {}
        for name, n in (("bfloat16", 8192), ("float32", 4096)):
            dt = getattr(torch, name)
            a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
            for _ in range(3):
                a @ b
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                a @ b
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / 10
            peaks[name] = {"dtype": name, "flops": 2.0 * n**3 / seconds, "size": n,
                           "tf32": torch.backends.cuda.matmul.allow_tf32}
    line = ", ".join(f"{k} {v['flops'] / 1e12:.3g} TFLOP/s" for k, v in peaks.items())
    return {"status": "passed", "reason": line, "figures": peaks}


def step_assets(work: Path, rehearse: bool) -> dict:
    t0 = time.time()
    assets = bench_gpu.build_assets(work / "assets", rehearse)
    return {"status": "passed", "reason": f"{assets['parameters'] / 1e9:.3g}B parameters, vocabulary "
            f"{assets['preset']['vocab']}, built in {time.time() - t0:.0f} s", "figures": assets}


def step_bench(work: Path, rehearse: bool, mode: str, side: str) -> dict:
    try:
        run = bench_gpu.run_side(work, mode, side, rehearse)
    except SystemExit as e:
        # liger-kernel is the one trl-best flag from outside trl: a run it breaks is tried again without it, and
        # the first failure is kept (the summary prints the flags the figures come from)
        _, w = bench_gpu.settings(mode, rehearse)
        if side != "trl-best" or not w.get("trl_flags", {}).get("trl-best", {}).get("use_liger_kernel"):
            raise
        print(f"trl-best failed with use_liger_kernel ({str(e).strip()[-300:]}); again without it", flush=True)
        run = bench_gpu.run_side(work, mode, side, rehearse, label="no-liger", drop_flags=("use_liger_kernel",))
        run["first_try_failed"] = str(e).strip()[-1000:]
    peak = run.get("peak_gpu_bytes")
    mem = f", peak GPU memory {peak / 2**30:.2f} GiB" if peak else ""
    return {"status": "passed", "reason": f"{run['tokens_per_second']:.0f} real tokens/s over "
            f"{len(run['probe']['steps'])} steps{mem}", "figures": {"run": run}}


def step_compare(work: Path, rehearse: bool, mode: str) -> dict:
    figures = bench_gpu.compare(work, mode, rehearse, _load(work, "matmul-peak")["figures"])
    ratios = figures.get("ours_over_trl_best")
    if not ratios:
        return {"status": "failed", "reason": f"only {', '.join(figures['sides'])} finished", "figures": figures}
    mem = f", peak GPU memory {ratios['peak_gpu_memory']:.2f}x" if "peak_gpu_memory" in ratios else ""
    return {"status": "passed", "reason": f"ours / {figures['baseline']}: tokens/s {ratios['rate']} "
            f"{ratios['tokens_per_second']:.2f}x{mem}", "figures": figures}


def step_dry_run(work: Path, rehearse: bool) -> dict:
    import gc
    from dataclasses import asdict

    import bench_train

    from finetune.recipe.schema import load_recipe
    from finetune.stages.dryrun import dry_run

    assets = json.loads((work / "assets" / "assets.json").read_text())
    figures = {}
    for mode in ("sft", "dpo"):
        _, w = bench_gpu.settings(mode, rehearse)
        run = work / "dryrun" / mode
        run.mkdir(parents=True, exist_ok=True)
        bench_train.ours_command(run, assets[mode], w, None, [])  # writes the recipe the benchmark trains
        recipe = load_recipe(run / "recipe.yaml", [])
        plan = dry_run(recipe)
        figures[mode] = {"peak_memory": plan["peak_memory"], "steps": plan["steps"], "tokens": plan["tokens"],
                         "parts": {name: asdict(p["memory_parts"]) for name, p in plan["stages"].items()}}
        measured = _load(work, f"{mode}-ours").get("figures", {}).get("run", {}).get("probe", {})
        if measured.get("largest_micro_batch"):
            figures[mode]["measured_micro_batch"] = micro_batch_estimate(recipe, assets["model"], plan,
                                                                         measured["largest_micro_batch"])
        gc.collect()
    line = ", ".join(f"{m} {f['peak_memory'] / 2**30:.2f} GiB" for m, f in figures.items())
    return {"status": "passed", "reason": f"estimates: {line}", "figures": figures}


def micro_batch_estimate(recipe, model_dir: str, plan: dict, micro_batch: dict) -> dict:
    """The memory estimate of the micro-batch a run measured (its tokens and labelled tokens), not the worst case.

    The dry run's model count of trainable weights is kept (from its adapter part), so that only the batch differs.
    """
    from transformers import AutoConfig

    from finetune.stages.memory import optimizer_bytes_per_param, recipe_estimate, sequences_per_micro_batch

    stage = recipe.effective_stages()[0]
    training = recipe.stage_training(stage)
    sequences = sequences_per_micro_batch(stage.kind, training.micro_batch_size)
    adapter = plan["stages"][stage.name]["memory_parts"].adapter
    trainable = adapter // (8 + optimizer_bytes_per_param(training.optimizer))
    seq_len = max(1, -(-micro_batch["tokens_slots"] // sequences))  # the batch's slots spread over its sequences
    memory = recipe_estimate(AutoConfig.from_pretrained(model_dir), recipe, stage, seq_len=seq_len,
                             labelled=micro_batch["tokens_labels"], trainable=trainable)
    return {"micro_batch": micro_batch, "seq_len": seq_len, "sequences": sequences, "estimate_bytes": memory.total}


def step_memory(work: Path, rehearse: bool) -> dict:
    estimates = _load(work, "dry-run")["figures"]
    rows = {}
    for mode in ("sft", "dpo"):
        run = _load(work, f"{mode}-ours").get("figures", {}).get("run", {})
        # like with like: the estimate of the micro-batch that was measured; the worst case beside it
        mb = estimates[mode].get("measured_micro_batch", {})
        measured, estimate = run.get("peak_gpu_bytes"), mb.get("estimate_bytes")
        rows[mode] = {"estimate_bytes": estimate, "worst_case_bytes": estimates[mode]["peak_memory"],
                      "micro_batch": mb.get("micro_batch"), "measured_bytes": measured,
                      "error": (estimate / measured - 1) if measured and estimate else None}
    if not any(r["measured_bytes"] for r in rows.values()):
        return {"status": "skipped", "reason": "no CUDA: nothing for torch.cuda.max_memory_allocated to measure "
                "(the estimates are in dry-run)", "figures": rows}
    line = ", ".join(f"{m}: estimate of the measured micro-batch {r['estimate_bytes'] / 2**30:.2f} GiB vs measured "
                     f"{r['measured_bytes'] / 2**30:.2f} GiB ({r['error']:+.0%}; worst case "
                     f"{r['worst_case_bytes'] / 2**30:.2f} GiB)" for m, r in rows.items()
                     if r["measured_bytes"] and r["estimate_bytes"])
    return {"status": "passed", "reason": line, "figures": rows}


def step_export(work: Path, rehearse: bool) -> dict:
    run = Path(_load(work, "sft-ours")["figures"]["run"]["run_dir"]) / "out"
    out = work / "export" / "sft-merged"
    cmd = [sys.executable, "-m", "finetune", "export", str(run), "--format", "merged", "--out", str(out),
           "--overwrite"]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    meta = json.loads((out / "export.json").read_text()) if (out / "export.json").exists() else {}
    if code != 0:
        return {"status": "failed", "reason": f"ft export exited with {code}", "figures": meta}
    return {"status": "passed", "reason": "merged export written and verified by ft export", "figures": meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("name")
    args = ap.parse_args(argv)
    work = Path(args.work)
    name = args.name
    try:
        # planted faults, for the check's own tests: a step that fails, or hangs until check.py kills it
        if name in os.environ.get("FT_GPU_CHECK_FAIL", "").split(","):
            raise RuntimeError("failure planted by FT_GPU_CHECK_FAIL")
        if name in os.environ.get("FT_GPU_CHECK_HANG", "").split(","):
            time.sleep(3600)
        if name in ("sft-ours", "sft-trl-best", "dpo-ours", "dpo-trl-best"):
            mode, side = name.split("-", 1)
            result = step_bench(work, args.rehearse, mode, side)
        elif name in ("sft-compare", "dpo-compare"):
            result = step_compare(work, args.rehearse, name.split("-")[0])
        elif name in ("fsdp-sft", "fsdp-dpo"):
            import fsdp_gpu

            result = fsdp_gpu.fsdp_run(work, name.split("-")[1], args.rehearse)
        elif name == "kernel-tests":
            from plan import KERNEL_SELECTION

            result = step_gpu_tests(work, args.rehearse, name, KERNEL_SELECTION)
        else:
            result = {"env": step_env, "gpu-tests": step_gpu_tests, "matmul-peak": step_matmul,
                      "assets": step_assets, "dry-run": step_dry_run, "memory": step_memory,
                      "export": step_export}[name](work, args.rehearse)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure becomes the step's result
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                  if str(e).strip() else type(e).__name__}
    _result(work, name, result)
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
