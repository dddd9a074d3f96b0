"""Start-up time of the `ft` command line against a bare Python interpreter.

    .venv/bin/python scripts/bench_cli.py                 # 7 alternating repetitions, medians
    .venv/bin/python scripts/bench_cli.py --reps 3 --json bench/cli.json

Each command runs in a fresh process, commands alternating within a repetition so that a burst of load on the
(shared) machine hits all of them; the table shows median wall time, the extra over `python -c pass` and the ratio
to it. Targets: `ft --help` under 0.5 s and `ft validate` under 1.5 s. `trl sft --help` is shown for reference
(`--trl` adds it; it imports torch and transformers, so it is slow).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = {"ft --help": 0.5, "ft validate": 1.5}


def commands(recipe: Path, with_trl: bool) -> dict[str, list[str]]:
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "ft --help": [str(BIN / "ft"), "--help"],
        "ft validate": [str(BIN / "ft"), "validate", str(recipe), "--quiet"],
    }
    if with_trl:
        cmds["trl sft --help"] = [str(BIN / "trl"), "sft", "--help"]
    return cmds


def time_once(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of the command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(cmds: dict[str, list[str]], reps: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    names = list(cmds)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(time_once(cmds[name]))
    return times


def report(times: dict[str, list[tuple[float, float]]]) -> tuple[dict, str]:
    """Medians. On a loaded machine wall time waits for a core; CPU time is what the command itself costs."""
    base = statistics.median(w for w, _ in times["python -c pass"])
    rows, lines = {}, ["| command | median wall s | min wall s | median CPU s | extra wall over python s "
                       "| ratio to python | target (wall) |", "|---|---|---|---|---|---|---|"]
    for name, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        med, cpu = statistics.median(walls), statistics.median(cpus)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"< {target} s: {'met' if med < target else 'NOT met'}"
        rows[name] = {"median": med, "min": min(walls), "cpu_median": cpu, "times": walls, "cpu_times": cpus,
                      "extra": med - base, "ratio": med / base, "target": target,
                      "met": None if target is None else med < target}
        lines.append(f"| `{name}` | {med:.3f} | {min(walls):.3f} | {cpu:.3f} | {med - base:.3f} | {med / base:.1f}x "
                     f"| {verdict} |")
    load = os.getloadavg()
    lines.append(f"\nLoad average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs (shared).")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--trl", action="store_true", help="also time `trl sft --help` (reference)")
    ap.add_argument("--json", default=None, help="write the measurements to this file")
    args = ap.parse_args(argv)
    rows, table = report(measure(commands(Path(args.recipe), args.trl), args.reps))
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
