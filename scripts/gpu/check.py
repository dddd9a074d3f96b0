"""The GPU acceptance check's driver: every step in its own process, each with a time budget, one summary.

    python scripts/gpu/check.py --wheels .whl --out OUT            # on the GPU machine (scripts/gpu/check.sh does this)
    python scripts/gpu/check.py --rehearse --out OUT               # every step on this CPU, tiny model

    python scripts/gpu/check.py --second --wheels .whl --out OUT   # the second call: kernel suite, export, FSDP

Standard library only: the driver imports nothing that a step installs, so a step that crashes, hangs or runs out
of memory ends as one failed row of the summary, not as a lost run. A step runs as `steps.py NAME` (see there) in a
process group of its own and is killed when it passes its budget or the check's total budget (`--budget`, 480 s on
the GPU: the machine allows 10 minutes per command). The order, the budgets and the rule for starting a step (60% of
its budget left) are `plan.py`'s; the plan is printed first. A step whose inputs failed is skipped, with the reason.
After every step `summary.json`, `summary.md` and `evidence.tar.gz` (evidence.py) are rewritten in OUT, so a check
stopped from outside still leaves what it measured; the output of every step goes to stdout (check.sh copies it to
OUT/check.log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import evidence  # noqa: E402
import summary as summary_md  # noqa: E402
from plan import DERIVED, STEPS, Step, expand, run_plan, second_call, table  # noqa: E402

SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|_KEY$|CREDENTIAL", re.IGNORECASE)


def write_wrappers(bin_dir: Path) -> Path:
    """`ft` and `trl` commands that run this interpreter (the wheels are importable, not installed as scripts)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, module in (("ft", "finetune"), ("trl", "trl.cli.main")):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        path.chmod(0o755)
    return bin_dir


def project_overlay(work: Path) -> Path:
    """An importable `finetune` for a checkout that is not installed; returns the folder to put on the path.

    The package's `finetune.kernels` lives in `kernels/` (pyproject's package-dir), which only an install maps: the
    GPU machine has the tree alone. `WORK/src/finetune` holds a link to every entry of `finetune/` and `kernels` ->
    `kernels/`, so the steps run the tree's own files (edits included) without installing anything.
    """
    pkg = work / "src" / "finetune"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in sorted((ROOT / "finetune").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    return pkg.parent


def step_env(work: Path, site: Path | None) -> dict[str, str]:
    """The environment of every step: the wheels first on the path, offline, no credentials.

    The tree's root is never on the path (nor, through `PYTHONSAFEPATH`, the working folder of `python -m ...` and
    `python -c ...` run from it): its top-level `kernels/` folder would hide the `kernels` package (the Hugging Face
    kernel hub) that bitsandbytes and transformers import, and its `finetune/` lacks `finetune.kernels`. `finetune`
    comes from the overlay, which holds nothing else; `scripts/` and `scripts/gpu/` follow it.
    """
    env = {k: v for k, v in os.environ.items() if not SECRET.search(k)}
    path = [str(site)] if site else []
    path += [str(project_overlay(work)), str(HERE.parent), str(HERE)]
    path += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(work / "hf-home"), FT_BENCH_BIN=str(write_wrappers(work / "bin")),
               FT_GPU_SITE=str(site or ""), FT_GPU_SRC=path[1 if site else 0])
    return env


def run_process(cmd: list[str], env: dict, timeout: float, prefix: str) -> tuple[int | None, float, list[str]]:
    """Run `cmd` in its own process group, echoing its output; kill the group at `timeout` seconds.

    Returns:
        The exit code (None when killed at the timeout), the wall seconds and the last 40 lines of output.
    """
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, errors="replace", bufsize=1)
    tail: list[str] = []
    timed_out = [False]

    def kill() -> None:
        timed_out[0] = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    timer = threading.Timer(max(timeout, 1), kill)
    timer.start()
    try:
        for line in proc.stdout:
            print(f"[{prefix}] {line.rstrip()}", flush=True)
            tail = (tail + [line.rstrip()])[-40:]
        proc.wait()
    finally:
        timer.cancel()
    return (None if timed_out[0] else proc.returncode), time.time() - t0, tail


def install(wheels: Path | None, site: Path, rehearse: bool, env: dict, timeout: float) -> dict:
    """The install step: every wheel (on the GPU), or those that fit this interpreter (rehearsal)."""
    if wheels is None:
        return {"status": "skipped", "reason": "no WHEELDIR given: the rehearsal uses this interpreter's packages"}
    from wheels import fitting

    fit, other = fitting(wheels)
    if other and not rehearse:
        return {"status": "failed", "reason": "wheels for another Python or platform: "
                + ", ".join(w.name for w in other)}
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, fit)]
    code, seconds, tail = run_process(cmd, env, timeout, "install")
    figures = {"installed": [w.name for w in fit], "not_for_this_python": [w.name for w in other],
               "target": str(site)}
    if code != 0:
        return {"status": "failed", "reason": f"pip exited with {code}", "figures": figures, "log_tail": tail}
    note = f"; {len(other)} wheel(s) for Python 3.12 left out on this Python" if other else ""
    return {"status": "passed", "reason": f"{len(fit)} wheels into {site}{note}", "figures": figures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="summary.json, summary.md (and check.log, written by check.sh)")
    ap.add_argument("--wheels", default=None, help="the wheelhouse (scripts/gpu/wheelhouse.sh)")
    ap.add_argument("--work", default=None, help="models, data and runs (default: $TMPDIR/ft-gpu-check)")
    ap.add_argument("--rehearse", action="store_true", help="run every step on the CPU with a tiny model")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 480 on a GPU, 900 rehearsal)")
    ap.add_argument("--only", default="", help="comma list of steps to run (the steps they need run too)")
    ap.add_argument("--second", action="store_true", help="the second call on a GPU: the full kernel suite, the "
                    "merged export and FSDP (with the steps they need)")
    ap.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                    help="another time budget for one step (repeatable)")
    args = ap.parse_args(argv)
    limits = {}
    for item in args.limit:
        step_name, _, seconds = item.partition("=")
        if step_name not in {s.name for s in STEPS} or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limit {item}: expected STEP=SECONDS with one of {', '.join(s.name for s in STEPS)}")
        limits[step_name] = float(seconds)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = "rehearse" if args.rehearse else "gpu"
    work = Path(args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"ft-gpu-{mode}").resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    (work / "results").mkdir(parents=True)
    wheels = Path(args.wheels).resolve() if args.wheels else None
    site = work / "site" if wheels else None
    env = step_env(work, site)
    budget = args.budget or (900.0 if args.rehearse else 480.0)
    started = time.time()
    only = expand({s for s in args.only.split(",") if s} | (second_call() if args.second else set()))
    results: dict[str, dict] = {}
    state = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_seconds": budget,
             "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
             "work": str(work), "python": sys.version.split()[0]}
    print(table(budget, limits, args.rehearse, only), flush=True)

    def run_step(step: Step, limit: float) -> dict:
        print(f"\n=== {step.name}: {step.title} (up to {limit:.0f} s)", flush=True)
        if step.name == "install":
            return install(wheels, site, args.rehearse, env, limit)
        cmd = [sys.executable, str(HERE / "steps.py"), "--work", str(work), step.name]
        cmd += ["--rehearse"] if args.rehearse else []
        code, _, tail = run_process(cmd, {**env, "FT_STEP_SECONDS": str(round(limit))}, limit, step.name)
        path = work / "results" / f"{step.name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if code is None:
            return {"timed_out": True, "log_tail": tail}
        if not result:
            return {"status": "failed", "reason": f"exit code {code}, no result", "log_tail": tail}
        if code != 0 and result.get("status") == "passed":
            result.update(status="failed", reason=f"exit code {code} after it reported passing")
        return result

    def after(step: Step, result: dict) -> None:
        results[step.name] = result
        if "seconds" in result:
            print(f"=== {step.name}: {result['status']} in {result['seconds']} s: {result.get('reason', '')}",
                  flush=True)
        for derived, (parent, _) in DERIVED.items():
            path = work / "results" / f"{derived}.json"
            if step.name == parent:
                results[derived] = (json.loads(path.read_text()) if path.exists()
                                    else {"status": "skipped", "reason": f"{parent}: {result['status']}"})
        state["wall_seconds"] = round(time.time() - started, 1)
        summary_md.write(out, state, results, STEPS, DERIVED)
        evidence.pack(out, work)  # after every step: a check stopped from outside still leaves its evidence

    run_plan(budget, limits, args.rehearse, only, run_step, after)
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    cut = [n for n, r in results.items() if r["status"] == "cut"]
    print(f"\ncheck {'passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {state['wall_seconds']} s"
          + (f"; cut off by the budget: {', '.join(cut)}" if cut else "") + f"; {out / 'summary.md'}, evidence in "
          f"{out / evidence.ARCHIVE}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
