"""`make test` / `make test-gpu` wiring: the GPU tests run in a pytest process of their own where CUDA exists (not
after the CPU kernel tests built Triton for the interpreter in the same process), alone with `make test-gpu`, and
`make test` says so where they are not run. CUDA is faked absent/present with FINETUNE_TESTS_CUDA."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("run_tests", ROOT / "scripts" / "run_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(which: str, cuda: str) -> list[str]:
    env = {"FINETUNE_TESTS_CUDA": cuda, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_tests.py"), which, "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_make_targets_call_the_selection_script():
    makefile = (ROOT / "Makefile").read_text()
    recipes = dict(re.findall(r"^(test|test-gpu): setup\n((?:\t.+\n)+)", makefile, flags=re.M))
    assert recipes == {"test": "\t$(MAKE) real-model\n\t$(BIN)/python scripts/run_tests.py all\n",
                       "test-gpu": "\t$(BIN)/python scripts/run_tests.py gpu\n"}
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_gpu_tests_get_their_own_process_where_cuda_exists():
    with_cuda = _dry_run("all", "1")
    assert with_cuda == ["would run: -m pytest -q -p no:cacheprovider tests --ignore=tests/gpu",
                         "would run: -m pytest -q -p no:cacheprovider -m gpu tests/gpu"]
    without = _dry_run("all", "0")
    assert without[0] == with_cuda[0] and len(without) == 2 and without[1].startswith("tests/gpu not run: no CUDA")
    assert _dry_run("gpu", "1") == _dry_run("gpu", "0") == [with_cuda[1]]  # alone; without CUDA pytest says why


def test_the_gpu_process_runs_without_the_interpreter(monkeypatch):
    script = _script()
    seen = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FINETUNE_TESTS_CUDA", "1")
    monkeypatch.setattr(script.subprocess, "call", lambda command, env: seen.append((command, env)) or 0)
    assert script.main(["all"]) == 0
    (cpu, cpu_env), (gpu, gpu_env) = seen
    assert "--ignore=tests/gpu" in cpu and cpu_env["TRITON_INTERPRET"] == "1"
    assert gpu[-1] == "tests/gpu" and "TRITON_INTERPRET" not in gpu_env
    monkeypatch.setattr(script.subprocess, "call", lambda command, env: 3 if "--ignore=tests/gpu" in command else 0)
    assert script.main(["all"]) == 3  # a failing CPU suite fails `make test` even when the GPU tests pass
