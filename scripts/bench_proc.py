"""Process helpers of the training benchmarks (`bench_train.py`, `bench_align.py`): the environment of a measured
run, running it with its wall time and peak memory, and the `sitecustomize` hook that installs the probe."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(run: Path, threads: int, probe_dir: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(run / "hf-datasets-cache"),
        # the caller's path, never the tree's root: its top-level kernels/ folder would hide the `kernels` package that
        # bitsandbytes and transformers import (finetune comes from the install, or from the GPU check's overlay)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), env.get("PYTHONPATH", "")])),
        "FT_BENCH_PROBE": str(run / "probe.json"),
    })
    return env


def run_measured(cmd: list[str], env: dict, log: Path, poll: float = 0.2, cap: int | None = None) -> dict:
    """Run a command; wall time, exit code, peak RSS of its largest process (wait4) and of its tree (sampled).

    With `cap` (bytes) the command's process group is killed as soon as its tree's resident memory passes it
    (`over_cap` says so)."""
    import psutil

    tree_peak = [0]
    over = [False]
    with log.open("w") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=cap is not None)

        def sample() -> None:
            try:
                root = psutil.Process(proc.pid)
                while proc.returncode is None:
                    total = 0
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    tree_peak[0] = max(tree_peak[0], total)
                    if cap is not None and total > cap:
                        over[0] = True
                        os.killpg(proc.pid, signal.SIGKILL)
                        return
                    time.sleep(poll)
            except (psutil.Error, ProcessLookupError):
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        sampler.join(timeout=2)
    return {"t_launch": t0, "wall_seconds": wall, "exit_code": proc.returncode, "over_cap": over[0],
            "peak_rss_mb": usage.ru_maxrss / 1024, "tree_peak_rss_mb": tree_peak[0] / 2**20}


def write_probe_hook(work: Path) -> Path:
    """A `sitecustomize` that installs the probe in child processes that have FT_BENCH_PROBE set."""
    d = work / "probe"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('FT_BENCH_PROBE'):\n"
        f"    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "    from bench_probe import install_probe\n    install_probe(os.environ['FT_BENCH_PROBE'])\n")
    return d
