"""The GPU check's plan: which steps, in which order, with which time budget, and when a step may still start.

Standard library only (the driver, `check.py`, imports nothing a step installs). The first call on a lent GPU has
about 8 minutes, so the order puts what only this run can tell us first: the environment, the device's matmul peak,
the assets, our SFT and DPO; then trl's runs on the same work, the comparisons, the memory estimate against the
measured peak, and a trimmed selection of the kernel tests (NF4 bit-exact, varlen attention, chunked cross-entropy).
The full kernel suite, the merged export and FSDP are a second call (`--second`, or `--only`); the rehearsal on the
CPU runs both calls' steps.

Budgets are caps, generous for the steps everything needs (env, assets, our runs): a step that ends sooner leaves
its time to the next. A step starts only while at least `START_SHARE` (60%) of its own budget is left of the
check's; otherwise it is skipped with that reason, and later, smaller steps may still start. A step killed at its
own budget failed; one cut off by the check's total budget is recorded as `cut` (not a failure of the step, and not
in the exit code).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

START_SHARE = 0.6  # a step starts only with at least this share of its own budget left


@dataclass(frozen=True)
class Step:
    """One step: its name, what it is, its budget in seconds (GPU, rehearsal), the steps it needs, and the call.

    `call` 1 is the first command on a lent GPU; `call` 2 steps run only when asked for (`--second`, `--only`), and
    always in the rehearsal.
    """

    name: str
    title: str
    budget: tuple[int, int]
    needs: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()  # at least one of these must have passed
    call: int = 1


STEPS = (
    Step("install", "install the wheels ahead of the image's packages (pip --no-index --no-deps --target)", (60, 60)),
    Step("env", "versions, where each package is imported from, CUDA, the bitsandbytes library loaded", (90, 60),
         needs=()),
    Step("matmul-peak", "bf16 (and fp32) matmul peak of this device, measured in this run", (45, 30), needs=("env",)),
    Step("assets", "random Llama (1.24B, 128k vocabulary; tiny on the CPU), tokenizer, SFT and DPO data", (90, 60),
         needs=("env",)),
    Step("sft-ours", "ft train: QLoRA SFT, recipe defaults", (150, 90), needs=("assets",)),
    Step("dpo-ours", "ft train: QLoRA DPO, recipe defaults", (150, 90), needs=("assets",)),
    Step("sft-trl-best", "trl sft: the same work, trl's best flags", (150, 120), needs=("assets",)),
    Step("dpo-trl-best", "trl dpo: the same work, trl's best flags", (150, 120), needs=("assets",)),
    Step("sft-compare", "SFT side by side: tokens/s after warm-up, peak GPU memory, MFU", (30, 45),
         needs=("matmul-peak",), any_of=("sft-ours", "sft-trl-best")),
    Step("dpo-compare", "DPO side by side: tokens/s after warm-up, pairs/s, peak GPU memory, MFU", (30, 45),
         needs=("matmul-peak",), any_of=("dpo-ours", "dpo-trl-best")),
    Step("dry-run", "ft train --dry-run of the SFT and DPO recipes: the memory estimate", (60, 60), needs=("assets",)),
    Step("memory", "the dry run's estimate of the measured micro-batch against the measured peak GPU memory", (20, 30),
         needs=("dry-run",), any_of=("sft-ours", "dpo-ours")),
    Step("kernel-tests", "tests/gpu, trimmed: NF4 bit-exact, varlen attention, chunked cross-entropy", (60, 90),
         needs=("env",)),
    Step("gpu-tests", "tests/gpu in full, in its own pytest process: compiled Triton kernels, forward and backward",
         (180, 90), needs=("env",), call=2),
    Step("export", "ft export --format merged of the SFT run, verified against the trained model", (150, 90),
         needs=("sft-ours",), call=2),
    Step("fsdp-sft", "SFT with distributed.strategy fsdp, one process: loss vs the plain run", (120, 90),
         needs=("sft-ours",), call=2),
    Step("fsdp-dpo", "DPO with distributed.strategy fsdp, one process: loss vs the plain run", (120, 90),
         needs=("dpo-ours",), call=2),
)
#: results one step writes for another row of the summary
DERIVED = {"nf4-bit-exact": ("kernel-tests", "NF4 dequantization bit-exact against bitsandbytes' CUDA kernels")}
#: the pytest selection of the trimmed kernel tests
KERNEL_SELECTION = "bit_exact or varlen or chunked_ce"


def second_call() -> set[str]:
    """The steps left for a second command on the GPU."""
    return {s.name for s in STEPS if s.call == 2}


def expand(names: set[str]) -> set[str]:
    """`names` with every step they need (directly or through others), install and env always."""
    if not names:
        return names
    by_name = {s.name: s for s in STEPS}
    unknown = names - by_name.keys()
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {sorted(unknown)}; steps: {', '.join(by_name)}")
    todo, out = list(names | {"install", "env"}), set()
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += [*by_name[name].needs, *by_name[name].any_of]
    return out


def blocked(step: Step, results: dict) -> str | None:
    """Why a step cannot run (an input step did not pass), or None."""
    for need in step.needs:
        if results.get(need, {}).get("status") != "passed":
            return f"needs {need}, which {results.get(need, {}).get('status', 'did not run')}"
    if step.any_of and not any(results.get(n, {}).get("status") == "passed" for n in step.any_of):
        return f"needs one of {', '.join(step.any_of)} to have passed"
    return None


def selected(step: Step, only: set[str], rehearse: bool) -> str | None:
    """Why a step is not part of this call (None: it is)."""
    if only:
        return None if step.name in only else "not asked for (--only)"
    if step.call == 2 and not rehearse:
        return "second call: scripts/gpu/check.sh --second WHEELDIR OUTDIR"
    return None


def may_start(own_budget: float, left: float) -> str | None:
    """Why a step with `own_budget` seconds must not start with `left` seconds of the check left (None: it may)."""
    if left < START_SHARE * own_budget:
        return (f"not started: {max(left, 0):.0f} s of the check's budget left, under {START_SHARE:.0%} of its own "
                f"{own_budget:.0f} s")
    return None


def table(budget: float, limits: dict[str, float], rehearse: bool, only: set[str]) -> str:
    """The plan as printed at the start: order, budget, and the call of every step."""
    lines = [f"plan ({budget:.0f} s in all; a step starts only with {START_SHARE:.0%} of its budget left):"]
    for i, s in enumerate(STEPS, 1):
        own = limits.get(s.name, s.budget[1 if rehearse else 0])
        why = selected(s, only, rehearse)
        lines.append(f"  {i:2d}. {s.name:<13} {own:4.0f} s  {'call ' + str(s.call):<7} {why or 'this call'}")
    return "\n".join(lines)


def run_plan(budget: float, limits: dict[str, float], rehearse: bool, only: set[str],
             run_step: Callable[[Step, float], dict], after: Callable[[Step, dict], None],
             clock: Callable[[], float] = time.time) -> dict[str, dict]:
    """Run the steps in order; returns every step's result.

    Args:
        budget: The check's total seconds.
        limits: Other budgets for some steps (`--limit`).
        rehearse: The CPU rehearsal (its budgets; both calls' steps).
        only: The steps asked for (with what they need); empty: this call's steps.
        run_step: Runs one step with a limit in seconds; returns its result (`status`, `reason`, ...), with
            `timed_out: True` when it was killed at the limit.
        after: Called after each step (with the step's result, or its skip), e.g. to rewrite the summary.
        clock: Seconds (the tests pass a fake one).
    """
    started = clock()
    results: dict[str, dict] = {}
    for step in STEPS:
        left = budget - (clock() - started)
        own = limits.get(step.name, step.budget[1 if rehearse else 0])
        why = selected(step, only, rehearse) or blocked(step, results) or may_start(own, left)
        if why is not None:
            result = {"status": "skipped", "reason": why}
        else:
            limit = min(own, left)
            t0 = clock()
            result = run_step(step, limit)
            if result.pop("timed_out", False):
                cut = limit < own
                result = {**result, "status": "cut" if cut else "failed",
                          "reason": (f"cut off by the check's {budget:.0f} s budget after {limit:.0f} s (its own "
                                     f"budget: {own:.0f} s)") if cut else f"timed out after {limit:.0f} s"}
            result["seconds"] = round(clock() - t0, 1)
        results[step.name] = result
        after(step, result)
    return results
