"""The GPU check's environment never puts the tree's root on the import path: its top-level `kernels/` folder would
hide the `kernels` package that bitsandbytes and transformers import ("cannot import name 'get_kernel' from
'kernels' (.../kernels/__init__.py)"). Its evidence archive holds what a failure needs, and nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from gpuscripts import gpu_scripts

ROOT = Path(__file__).resolve().parents[2]
PROBE = ("import importlib.util, json, finetune.kernels as fk; s = importlib.util.find_spec('kernels'); "
         "print(json.dumps([s.origin if s else None, fk.__file__]))")


@pytest.fixture(scope="module")
def gpu():
    with gpu_scripts("check", "evidence") as modules:
        yield modules


def _imports(env: dict) -> tuple[str | None, str]:
    """Where `kernels` and `finetune.kernels` come from in a process with `env`, run from the tree's root as the
    check's steps are."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_kernels_from_the_checks_environment_is_not_ours(gpu, tmp_path, monkeypatch):
    check, _ = gpu
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # even a caller that has the root on its path
    env = check.step_env(tmp_path / "work", None)
    assert str(ROOT) not in env["PYTHONPATH"].split(os.pathsep)
    hub, ours = _imports(env)
    assert hub is None or not Path(hub).resolve().is_relative_to(ROOT)
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()  # ours, as finetune.kernels
    # the training runs' environment, built from it by the benchmark (scripts/bench_proc.py)
    import bench_proc

    monkeypatch.setattr(os, "environ", dict(env))
    child = bench_proc.child_env(tmp_path / "run", 1, tmp_path / "probe")
    assert str(ROOT) not in child["PYTHONPATH"].split(os.pathsep)
    hub, _ = _imports(child)
    assert hub is None or not Path(hub).resolve().is_relative_to(ROOT)


def test_the_evidence_archive_holds_logs_probes_and_test_results(gpu, tmp_path, monkeypatch):
    _, evidence = gpu
    out, work = tmp_path / "out", tmp_path / "work"
    run = work / "bench" / "runs" / "sft-ours-0"
    for path, text in {out / "check.log": "=== env: passed\n", out / "summary.json": "{}",
                       work / "results" / "env.json": "{}", work / "results" / "kernel-tests.jsonl": "{}\n",
                       run / "log.txt": "x" * 100 + "Traceback: the end\n", run / "probe.json": "{}",
                       run / "probe.json.process-7.json": "{}", run / "out" / "summary.json": "{}",
                       run / "out" / "sft" / "adapter" / "adapter_config.json": "{}",
                       work / "assets" / "model" / "config.json": "{}", work / "src" / "finetune" / "x.json": "{}",
                       work / "assets" / "model" / "model.safetensors": "weights"}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(evidence, "MAX_FILE", 50)
    archive = evidence.pack(out, work)
    assert archive == out / "evidence.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        log = tar.extractfile("work/bench/runs/sft-ours-0/log.txt").read().decode()
        left_out = json.loads(tar.extractfile("left_out.json").read())
    assert names == {"out/check.log", "out/summary.json", "work/results/env.json", "work/results/kernel-tests.jsonl",
                     "work/bench/runs/sft-ours-0/log.txt", "work/bench/runs/sft-ours-0/probe.json",
                     "work/bench/runs/sft-ours-0/probe.json.process-7.json",
                     "work/bench/runs/sft-ours-0/out/summary.json", "left_out.json"}
    assert log.endswith("Traceback: the end\n") and len(log) == 50  # the end of a long log is kept
    assert left_out["left_out"] == ["work/bench/runs/sft-ours-0/log.txt: first 69 of 119 bytes left out"]
