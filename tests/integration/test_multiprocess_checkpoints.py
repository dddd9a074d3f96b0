"""Checkpoints stay atomic with several processes: 2 CPU processes (gloo, `ft train --nproc 2`), one of them killed
in the middle of writing a checkpoint (the FINETUNE_FAULT_CHECKPOINT hook of finetune.run.checkpoints: it exits after
its model, optimizer and RNG files are written, before anything is renamed). The previous checkpoint survives, complete
and the newest, no half-written `checkpoint-N` folder exists, and `--resume --nproc 2` continues from it to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune.run.checkpoints import FAULT, list_checkpoints, verify

STEPS, SAVE_EVERY, KILLED_AT = 6, 2, 4


def ft(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, text=True, timeout=900,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny_model, addition_data, tmp_path):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: atomic-two-processes
model: {{name_or_path: {tiny_model}, dtype: float32}}
lora: {{r: 4, alpha: 8}}
data: {{train: [{{path: {addition_data['train']}}}], max_length: 48}}
training: {{max_steps: {STEPS}, save_steps: {SAVE_EVERY}, save_total_limit: 3, micro_batch_size: 2,
           learning_rate: 5.0e-3, logging_steps: 1, seed: 1}}
stages: [{{name: sft, kind: sft}}]
output: {{dir: {run}}}
""")
    # process 1 (not the one that renames) dies: process 0 must not publish a checkpoint without its files
    killed = ft(["train", str(recipe), "--nproc", "2"], tmp_path, **{FAULT: f"{KILLED_AT}:1"})
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert f"process 1 exits while writing checkpoint-{KILLED_AT}" in killed.stdout, killed.stdout[-3000:]
    root = run / "sft" / "checkpoints"
    assert (root / ".staging" / f"checkpoint-{KILLED_AT}").is_dir()  # the write the kill interrupted, unpublished
    named = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert named == [f"checkpoint-{SAVE_EVERY}"], named  # no half-written checkpoint-4 under its final name
    (survivor,) = list_checkpoints(root)
    assert verify(survivor) is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in survivor.iterdir()}  # both processes' parts

    resumed = ft(["train", str(run), "--resume", "--nproc", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from {survivor}" in resumed.stdout or f"checkpoint-{SAVE_EVERY}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line) and json.loads(line).get("stage") == "sft"]
    assert steps == list(range(1, STEPS + 1)), steps
    final = list_checkpoints(root)
    assert [p.name for p in final] == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    assert all(verify(p) is None for p in final) and not (root / ".staging").exists()
