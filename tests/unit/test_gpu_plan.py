"""The GPU check's plan (scripts/gpu/plan.py): our runs first, a step starts only with 60% of its budget left, a
step cut off by the check's budget is no failure; and each kernel test's result is on disk the moment it finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gpuscripts import gpu_scripts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan():
    with gpu_scripts("plan") as modules:
        yield modules[0]


class Clock:
    """A fake clock the planted steps move forward."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(plan, budget, seconds: dict[str, float], hang=(), only=(), rehearse=False):
    """Run the plan with steps that take `seconds[name]` (default 1 s); steps in `hang` run to their limit."""
    clock, ran, rows = Clock(), [], []

    def run_step(step, limit):
        ran.append((step.name, limit))
        if step.name in hang:
            clock.now += limit
            return {"timed_out": True}
        clock.now += seconds.get(step.name, 1.0)
        return {"status": "passed", "reason": "ok"}

    results = plan.run_plan(budget, {}, rehearse, set(only), run_step, lambda s, r: rows.append(s.name), clock)
    return results, dict(ran), rows


def test_ours_first_then_trl_then_comparisons_then_trimmed_kernel_tests(plan):
    names = [s.name for s in plan.STEPS if s.call == 1]
    assert names[:6] == ["install", "env", "matmul-peak", "assets", "sft-ours", "dpo-ours"]
    assert names.index("dpo-ours") < names.index("sft-trl-best") < names.index("sft-compare") < names.index("memory")
    assert names[-1] == "kernel-tests"
    assert plan.second_call() == {"gpu-tests", "export", "fsdp-sft", "fsdp-dpo"}
    # on a GPU the second call's steps are not run unless asked for; the rehearsal runs them
    results, ran, _ = _run(plan, 10_000, {})
    assert "fsdp-sft" not in ran and "second call" in results["fsdp-sft"]["reason"]
    assert "fsdp-sft" in _run(plan, 10_000, {}, rehearse=True)[1]


def test_a_planted_slow_step_leaves_no_step_to_start_with_too_little_budget(plan):
    """sft-ours takes 420 s of 480, leaving 56 s: a step starts only with 60% of its own budget left (dpo-ours and
    trl's runs do not, where before they started and were killed as FAILED); smaller later steps still do."""
    budgets = {s.name: s.budget[0] for s in plan.STEPS}
    results, ran, rows = _run(plan, 480, {"sft-ours": 420})
    for name, limit in ran.items():
        assert limit >= 0.6 * budgets[name], name
    assert results["dpo-ours"] == {"status": "skipped", "reason": "not started: 56 s of the check's budget left, "
                                   f"under 60% of its own {budgets['dpo-ours']} s"}
    assert {"sft-trl-best", "dpo-trl-best", "dpo-ours"}.isdisjoint(ran)
    assert {"sft-compare", "dry-run", "memory", "kernel-tests"} <= ran.keys()
    assert results["dpo-compare"]["reason"] == "needs one of dpo-ours, dpo-trl-best to have passed"
    assert not [n for n, r in results.items() if r["status"] == "failed"]
    assert rows == [s.name for s in plan.STEPS]  # the summary was rewritten after every step, skipped ones too


def test_a_step_cut_by_the_checks_budget_is_not_a_failure_but_one_past_its_own_budget_is(plan):
    results, ran, _ = _run(plan, 200, {"sft-ours": 100}, hang=("dpo-ours",))
    own = {s.name: s.budget[0] for s in plan.STEPS}["dpo-ours"]
    assert ran["dpo-ours"] < own and results["dpo-ours"]["status"] == "cut"
    assert "cut off by the check's 200 s budget" in results["dpo-ours"]["reason"]
    results, ran, _ = _run(plan, 10_000, {}, hang=("dpo-ours",))
    assert results["dpo-ours"] == {"status": "failed", "reason": f"timed out after {own} s", "seconds": own}


def test_each_test_result_is_written_as_it_finishes_and_survives_a_kill(tmp_path):
    """A pytest killed in its second test keeps the first test's result (a JUnit report would be lost)."""
    (tmp_path / "test_planted.py").write_text(
        "import time\n\ndef test_fast():\n    assert 1 + 1 == 2\n\n"
        "def test_skipped():\n    import pytest\n    pytest.skip('no CUDA')\n\n"
        "def test_hangs():\n    time.sleep(600)\n")
    report = tmp_path / "results.jsonl"
    env = {**os.environ, "FT_TEST_RESULTS": str(report),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts" / "gpu"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "live_results",
                             str(tmp_path / "test_planted.py")], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not report.exists() or report.read_text().count("\n") < 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(c["name"], c["outcome"]) for c in lines] == [("test_fast", "passed"), ("test_skipped", "skipped")]
    assert "no CUDA" in lines[1]["message"]
