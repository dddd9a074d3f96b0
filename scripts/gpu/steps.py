"""The GPU check's steps, one per process: `python scripts/gpu/steps.py --work WORK [--rehearse] NAME`.

Each step writes `WORK/results/NAME.json`: `status` (passed, failed, skipped, refused), `reason` (one line) and
`figures`. `check.py` runs them in order, with a time budget each, and builds the summary from these files.

    env           package versions and where each is imported from, CUDA, the bitsandbytes library it loaded
    gpu-tests     tests/gpu in its own pytest process (also writes nf4-bit-exact: the NF4 tests' share of it)
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

REQUIRED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "pydantic", "finetune",
            "finetune.kernels")
OPTIONAL = ("tokenizers", "huggingface_hub", "typer", "safetensors", "triton", "liger_kernel", "flash_attn", "pyarrow",
            "numpy")


def _result(work: Path, name: str, result: dict) -> None:
    path = work / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))


def _load(work: Path, name: str) -> dict:
    path = work / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "missing"}


def step_env(work: Path, rehearse: bool) -> dict:
    import importlib
    import importlib.metadata as md
    import os

    site = os.environ.get("FT_GPU_SITE") or None
    modules, broken = {}, []
    for name in REQUIRED + OPTIONAL:
        try:
            m = importlib.import_module(name)
            origin = str(Path(m.__file__).resolve()) if getattr(m, "__file__", None) else "?"
            where = ("wheels" if site and origin.startswith(str(Path(site).resolve())) else
                     "project" if origin.startswith(str(ROOT)) else str(Path(origin).parents[1]))
            modules[name] = {"version": getattr(m, "__version__", None), "from": where}
        except Exception as e:  # noqa: BLE001 - any failure to import is what this step reports
            modules[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if name in REQUIRED:
                broken.append(name)
    problems = []
    if "finetune" not in broken:  # the tree's files through check.py's overlay, not an installed or stale copy
        import finetune

        pkg_dir = Path(finetune.__path__[0])
        src = os.environ.get("FT_GPU_SRC")
        if src and pkg_dir.parent != Path(src):
            problems.append(f"finetune imported from {pkg_dir}, not the check's copy of the tree in {src}")
    import torch

    figures: dict = {"modules": modules, "python": sys.version.split()[0],
                     "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        figures.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1))
    if "bitsandbytes" not in broken:
        from bitsandbytes import cextension

        lib = getattr(cextension.lib, "_lib", None)
        figures["bitsandbytes_library"] = Path(getattr(lib, "_name", "none")).name
        figures["bitsandbytes_cuda"] = bool(getattr(cextension.lib, "compiled_with_cuda", False))
    from packaging.requirements import Requirement
    from packaging.version import Version
    from wheels import TARGET_ENV, pins

    wrong, unmet = [], []
    env = {**TARGET_ENV, "python_version": ".".join(map(str, sys.version_info[:2]))}
    for name, pinned in pins().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            wrong.append(f"{name}: not installed")
            continue
        if site and have != pinned:
            wrong.append(f"{name}: {have} found first on the path, {pinned} carried")
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            try:
                dep = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{name} needs {req}: not installed")
                continue
            if not req.specifier.contains(Version(dep), prereleases=True):
                unmet.append(f"{name} needs {req}: {dep} installed")
    figures.update(pins_not_first=wrong, unmet_requirements=unmet)
    problems += [f"cannot import {', '.join(broken)}"] if broken else []
    problems += wrong if site else []
    if not rehearse and not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if not rehearse and not figures.get("bitsandbytes_cuda"):
        problems.append(f"bitsandbytes loaded {figures.get('bitsandbytes_library')}, not a CUDA library")
    if problems:
        return {"status": "failed", "reason": "; ".join(problems), "figures": figures}
    where = figures.get("device", "CPU")
    note = f"; {len(unmet)} requirement(s) of the image not met (see figures)" if unmet else ""
    return {"status": "passed", "reason": f"{where}, torch {torch.__version__}, bitsandbytes library "
            f"{figures.get('bitsandbytes_library')}{note}", "figures": figures}


def step_gpu_tests(work: Path, rehearse: bool) -> dict:
    import xml.etree.ElementTree as ET

    xml = work / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu", "-rs",
           f"--junitxml={xml}"]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if not xml.exists():
        return {"status": "failed", "reason": f"pytest exited with {code} and wrote no report"}
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, (el.get("message") or "")[:300]
        cases.append({"name": case.get("name"), "outcome": outcome, "message": message,
                      "seconds": float(case.get("time") or 0)})

    def verdict(subset: list[dict], what: str) -> dict:
        counts = {k: sum(c["outcome"] == k for c in subset) for k in ("passed", "failure", "error", "skipped")}
        bad = [f"{c['name']}: {c['message']}" for c in subset if c["outcome"] in ("failure", "error")]
        figures = {"counts": counts, "failed": bad, "slowest": sorted(subset, key=lambda c: -c["seconds"])[:3]}
        if not subset:
            return {"status": "failed", "reason": f"no {what} collected", "figures": figures}
        if bad:
            return {"status": "failed", "reason": f"{len(bad)} of {len(subset)} {what} failed", "figures": figures}
        if counts["skipped"] == len(subset):
            reasons = sorted({c["message"] for c in subset})
            return {"status": "skipped", "reason": f"all {len(subset)} {what} skipped: {'; '.join(reasons)}",
                    "figures": figures}
        return {"status": "passed", "reason": f"{counts['passed']} {what} passed, {counts['skipped']} skipped",
                "figures": figures}

    nf4 = [c for c in cases if "bit_exact" in c["name"]]
    _result(work, "nf4-bit-exact", verdict(nf4, "NF4 bit-exact tests"))
    out = verdict(cases, "GPU tests")
    out["figures"]["pytest_exit_code"] = code
    return out


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
    return {"status": "passed", "reason": f"ours / trl best flags: tokens/s {ratios['tokens_per_second']:.2f}x{mem}",
            "figures": figures}


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
        plan = dry_run(load_recipe(run / "recipe.yaml", []))
        figures[mode] = {"peak_memory": plan["peak_memory"], "steps": plan["steps"], "tokens": plan["tokens"],
                         "parts": {name: asdict(p["memory_parts"]) for name, p in plan["stages"].items()}}
        gc.collect()
    line = ", ".join(f"{m} {f['peak_memory'] / 2**30:.2f} GiB" for m, f in figures.items())
    return {"status": "passed", "reason": f"estimates: {line}", "figures": figures}


def step_memory(work: Path, rehearse: bool) -> dict:
    estimates = _load(work, "dry-run")["figures"]
    rows = {}
    for mode in ("sft", "dpo"):
        run = _load(work, f"{mode}-ours").get("figures", {}).get("run", {})
        measured, estimate = run.get("peak_gpu_bytes"), estimates[mode]["peak_memory"]
        rows[mode] = {"estimate_bytes": estimate, "measured_bytes": measured,
                      "error": (estimate / measured - 1) if measured else None}
    if not any(r["measured_bytes"] for r in rows.values()):
        return {"status": "skipped", "reason": "no CUDA: nothing for torch.cuda.max_memory_allocated to measure "
                "(the estimates are in dry-run)", "figures": rows}
    line = ", ".join(f"{m}: estimate {r['estimate_bytes'] / 2**30:.2f} GiB vs measured "
                     f"{r['measured_bytes'] / 2**30:.2f} GiB ({r['error']:+.0%})" for m, r in rows.items()
                     if r["measured_bytes"])
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
