"""Helpers of the resume / interrupt tests: a tiny recipe, `ft train` in a subprocess or in-process, loss curves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from transformers import TrainerCallback
from typer.testing import CliRunner

from finetune.cli import app

MAX_STEPS = 16


class TermAtStep(TrainerCallback):
    """Sends a signal to this process at the end of one step, as a scheduler or a Ctrl-C could at any moment."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step = step
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def write_recipe(folder: Path, model: Path, data: Path, name: str = "run", **training) -> Path:
    """A tiny SFT recipe writing its run to `folder/runs/<name>`; `training` overrides keys of the training section."""
    settings = {"max_steps": MAX_STEPS, "micro_batch_size": 4, "learning_rate": 1.0e-2, "logging_steps": 1,
                "seed": 3, "save_total_limit": 2, **training}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"model: {{name_or_path: {model}, dtype: float32}}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"data: {{train: [{{path: {data}}}], max_length: 64, cache_dir: null}}\n"
        f"training: {json.dumps(settings)}\n"
        f"output: {{dir: {folder / 'runs' / name}}}\n"
    )
    return path


def losses(run_dir: Path, stage: str = "sft") -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a step logged twice would show as a changed value, not a gap)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == stage and "loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row["loss"]
    return out


def train_here(*args: str):
    """`ft train ...` in this process (typer's runner); returns the result."""
    return CliRunner().invoke(app, ["train", *args])


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false"}


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    """`ft ...` (through `python -m finetune`, i.e. the console script's main) in a child process."""
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Block until metrics.jsonl shows `step` (fails if the process ends or the time runs out first)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ft train ended (code {proc.returncode}) before step {step}:\n{out}\n{err}")
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def assert_same_curve(resumed: dict[int, float], reference: dict[int, float], tol: float = 1e-4) -> None:
    """Every step present once in both, losses equal within `tol` (threads may differ between the runs)."""
    assert sorted(resumed) == sorted(reference) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(resumed[s] - reference[s]) for s in reference)
    assert worst <= tol, {s: (resumed[s], reference[s]) for s in reference}


def write_dpo_recipe(folder: Path, model: Path, name: str = "run", **training) -> Path:
    """One DPO stage (8 steps, every step logged) on addition preference pairs, from a fresh adapter against the base
    model as reference; no scheduled checkpoints unless `training` (keys of the training section) asks for them."""
    settings = {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 5.0e-3, "logging_steps": 1, "seed": 3,
                **training}
    pairs = folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with pairs.open("w") as f:
        for i in range(32):
            a, b = i % 8, (i * 3) % 8
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"add {a} {b}"}],
                                "chosen": [{"role": "assistant", "content": str(a + b)}],
                                "rejected": [{"role": "assistant", "content": str(a + b + 1)}]}) + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"model: {{name_or_path: {model}, dtype: float32}}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"data: {{train: [{{path: {pairs}}}], max_length: 64, cache_dir: null}}\n"
        f"training: {json.dumps(settings)}\n"
        "stages: [{name: dpo, kind: dpo, init_from: new, dpo: {reference: base}}]\n"
        f"output: {{dir: {folder / 'runs' / name}}}\n"
    )
    return path


#: `ft train ARGS` in a child whose trainer creates `PAUSE_MARKER` and waits `PAUSE_SECONDS` at the start of the step
#: after `PAUSE_AFTER_STEP` (env): that step's metrics row and checkpoint are on disk by then, so a kill lands at a
#: known point.
PAUSE_AFTER = textwrap.dedent("""
    import os, sys, time
    from transformers import TrainerCallback
    import finetune.stages.common as common

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["PAUSE_AFTER_STEP"]):
                open(os.environ["PAUSE_MARKER"], "w").close()
                time.sleep(float(os.environ.get("PAUSE_SECONDS", "600")))

    quiet = common.quiet_trainer
    common.quiet_trainer = lambda trainer: (quiet(trainer), trainer.add_callback(Pause()))
    from finetune.cli import main
    sys.argv = ["ft", *sys.argv[1:]]
    main()
""")


def spawn_paused(args: list[str], cwd: Path, after_step: int, timeout: float = 400) -> subprocess.Popen:
    """`ft ARGS` in a child; returns once it has paused at the start of step `after_step + 1` (see `PAUSE_AFTER`)."""
    marker = Path(cwd) / f"paused-after-{after_step}"
    env = {**subprocess_env(), "PAUSE_AFTER_STEP": str(after_step), "PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"ft train did not pause after step {after_step}:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.02)
    return proc
