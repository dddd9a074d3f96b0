"""The GPU acceptance check's rehearsal (`scripts/gpu/check.sh --rehearse`): every step on this CPU, tiny model.

What a GPU run adds (CUDA asserts, peak GPU memory, FSDP proper) cannot run here; what is tested is that every step
of the script runs, writes what the summary reads, and that a failing or hanging step is recorded while the steps
that do not depend on it still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-check")
    out = base / "out"
    env = {**os.environ, "TMPDIR": str(base), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu/check.sh"), "--rehearse", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    return done, out, json.loads((out / "summary.json").read_text())


def test_every_step_runs_on_the_cpu(rehearsal):
    done, out, summary = rehearsal
    steps = summary["steps"]
    assert done.returncode == 0, done.stdout[-3000:]
    # no wheels given; no CUDA here
    expected_skips = {"install", "gpu-tests", "kernel-tests", "nf4-bit-exact", "memory"}
    assert {n for n, r in steps.items() if r["status"] == "passed"} == set(steps) - expected_skips
    assert "no CUDA" in steps["gpu-tests"]["reason"] and "no CUDA" in steps["memory"]["reason"]
    assert steps["gpu-tests"]["figures"]["counts"]["skipped"] > 10  # tests/gpu was collected in its own process
    trimmed = steps["kernel-tests"]["figures"]["counts"]["skipped"]
    assert 0 < trimmed < steps["gpu-tests"]["figures"]["counts"]["skipped"]
    env = steps["env"]["figures"]
    assert env["modules"]["finetune.kernels"]["from"] == "project"  # through the overlay of the tree
    assert env["kernels_package"] is None or not env["kernels_package"].startswith(str(ROOT))
    log = (out / "check.log").read_text()
    assert "plan (900 s in all; a step starts only with 60% of its budget left)" in log
    assert log.index("=== sft-ours") < log.index("=== dpo-ours") < log.index("=== sft-trl-best")
    for mode in ("sft", "dpo"):
        sides = steps[f"{mode}-compare"]["figures"]["sides"]
        assert sides["ours"]["tokens_per_second"] > 0 and sides["trl-best"]["tokens_per_second"] > 0
        assert sides["ours"]["tokens_per_second_after_warmup"] > 0 and sides["ours"]["warmup_steps"] == 1
        assert sum(sum(c.values()) for c in sides["ours"]["attention_calls"].values()) > 0  # the stage summary's counts
        assert steps["dry-run"]["figures"][mode]["measured_micro_batch"]["estimate_bytes"] > 0
        assert 0 < sides["ours"]["mfu"] < 1
        assert steps[f"{mode}-compare"]["figures"]["ours_over_trl_best"]["same_label_tokens"]
        assert steps["dry-run"]["figures"][mode]["peak_memory"] > 0
        fsdp = steps[f"fsdp-{mode}"]["figures"]
        assert fsdp["max_relative_loss_difference"] <= fsdp["tolerance"]
    assert steps["export"]["status"] == "passed"
    md = (out / "summary.md").read_text()
    assert "## SFT: ft train vs trl sft" in md and "## DPO" in md and "| fsdp-dpo |" in md
    assert (out / "check.log").read_text().count("=== ") >= 2 * len(steps) - 6
    import tarfile

    with tarfile.open(out / "evidence.tar.gz") as tar:
        names = tar.getnames()
    assert "out/check.log" in names and "out/summary.json" in names and "work/results/env.json" in names
    assert any(n.endswith("sft-ours-0/probe.json") or "/runs/sft-ours" in n for n in names)


def test_a_failing_and_a_hanging_step_do_not_stop_the_others(tmp_path):
    env = {**os.environ, "FT_GPU_CHECK_FAIL": "matmul-peak", "FT_GPU_CHECK_HANG": "assets"}
    cmd = [sys.executable, str(ROOT / "scripts/gpu/check.py"), "--rehearse", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--only", "matmul-peak,assets,dry-run", "--limit", "assets=4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    assert done.returncode == 1
    assert steps["env"]["status"] == "passed"
    assert steps["matmul-peak"]["status"] == "failed" and "planted" in steps["matmul-peak"]["reason"]
    assert steps["assets"] == {**steps["assets"], "status": "failed", "reason": "timed out after 4 s"}
    assert steps["dry-run"] == {"status": "skipped", "reason": "needs assets, which failed"}
    assert steps["sft-ours"]["reason"] == "not asked for (--only)"
    assert "FAILED" in (tmp_path / "out" / "summary.md").read_text()
