"""The GPU check's summary: `summary.json` (everything the steps reported) and `summary.md` (the tables to read).

Standard library only; written by `check.py` after every step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MARK = {"passed": "passed", "failed": "FAILED", "skipped": "skipped", "refused": "refused", "cut": "cut (budget)"}


def _gib(n: float | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _side_rows(cmp: dict) -> list[str]:
    dpo = cmp["mode"] == "dpo"
    baseline = cmp.get("baseline", "trl best flags")
    lines = [f"| side | real tokens/s (whole run) | {'pairs/s | ' if dpo else ''}tokens/s after warm-up | spread of "
             "step rates | peak GPU memory | MFU | steps | label tokens | time to first step s | train loss (last "
             "quarter) |", "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if dpo else "")]
    for name, s in cmp["sides"].items():
        label = f"{name} ({baseline})" if name == "trl-best" else name
        warm = (f"{_f(s.get('tokens_per_second_after_warmup'), '.0f')} (first {s.get('warmup_steps')} steps left "
                f"out, {s.get('measured_steps')} measured)")
        lines.append(f"| {label} | {s['tokens_per_second']:.0f} | "
                     + (f"{s['pairs_per_second']:.2f} | " if dpo else "")
                     + f"{warm} | {_f(s.get('rate_spread'), '.1%')} | {_gib(s['peak_gpu_bytes'])} | "
                     f"{s['mfu']:.1%} | {s['steps']} | {s['tokens_labels']} | {s['time_to_first_step']:.1f} | "
                     f"{_f(s['final_train_loss'], '.4f')} |")
    ratios = cmp.get("ours_over_trl_best")
    if ratios:
        mem = ratios.get("peak_gpu_memory")
        whole = _f(ratios.get("tokens_per_second_whole_run"), ".2f")
        mem = f"{mem:.2f}x" if mem else "n/a"
        lines += ["", f"ours / {baseline}: tokens/s {ratios.get('rate', 'whole run')} "
                  f"**{ratios['tokens_per_second']:.2f}x** (whole run {whole}x), peak GPU memory **{mem}**;"
                  f" same label tokens: {ratios['same_label_tokens']}."]
    calls = cmp["sides"].get("ours", {}).get("attention_calls")
    if calls:
        per_stage = [f"{stage}: " + (", ".join(f"{k} {v}" for k, v in c.items()) or "none counted")
                     for stage, c in calls.items()]
        lines.append("Our attention calls by the path that ran: " + "; ".join(per_stage) + ".")
    if cmp.get("targets"):
        lines.append("Targets: " + "; ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in cmp["targets"].items())
                     + ".")
    lines.append(f"trl best flags: `{json.dumps(cmp['trl_best_flags'])}`; " + "; ".join(cmp["trl_notes"]) + ".")
    lines.append(f"MFU: {cmp['flops_per_token'] / 1e9:.2f} GFLOP per real token (scripts/bench_probe.py"
                 + (", plus the reference forward" if dpo else "") + f") x tokens/s over the {cmp['mfu_against']}.")
    ds = cmp["dataset"]
    lines.append(f"Data: {ds['samples']} sequences, {ds['tokens']} tokens (mean {ds['mean_length']:.0f}, "
                 f"{ds['min_length']}-{ds['max_length']}), {ds['label_fraction']:.0%} labelled.")
    return lines


def markdown(state: dict, results: dict[str, dict], steps: tuple, derived: dict) -> str:
    """The summary as markdown: one row per step, then the figures of the steps that measured something."""
    env = results.get("env", {}).get("figures", {})
    device = env.get("device") or ("CPU (rehearsal)" if state["mode"] == "rehearse" else "no CUDA device")
    lines = [f"# GPU check ({state['mode']}): {device}", "",
             f"Started {state['started']}, {state.get('wall_seconds', 0):.0f} s of a {state['budget_seconds']:.0f} s "
             f"budget; Python {state['python']}, torch {env.get('modules', {}).get('torch', {}).get('version', '?')}"
             f" (CUDA {env.get('torch_cuda')}). Command: `{state['command']}`.", "",
             "| step | what | status | seconds | result |", "|---|---|---|---|---|"]
    titles = {s.name: s.title for s in steps} | {k: v[1] for k, v in derived.items()}
    order = [s.name for s in steps]
    for name, (parent, _) in derived.items():
        order.insert(order.index(parent) + 1, name)
    for name in order:
        r = results.get(name)
        if r is None:
            continue
        reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {titles[name]} | {MARK.get(r['status'], r['status'])} | "
                     f"{_f(r.get('seconds'), '.0f')} | {reason[:400]} |")
    for mode in ("sft", "dpo"):
        r = results.get(f"{mode}-compare", {})
        if r.get("status") == "passed" or r.get("figures", {}).get("sides"):
            lines += ["", f"## {mode.upper()}: ft train vs trl {mode}, same work", "", *_side_rows(r["figures"])]
    mem = results.get("memory", {})
    if mem.get("status") == "passed":
        lines += ["", "## Memory: `ft train --dry-run` estimate vs measured peak (torch.cuda.max_memory_allocated)", "",
                  "The estimate is the one of the largest micro-batch the run measured (its tokens and labelled "
                  "tokens); the dry run's worst case (every micro-batch at max_length, all labelled) stands beside it.",
                  "", "| stage | measured micro-batch | estimate for it | measured | estimate / measured - 1 | "
                  "worst case |",
                  "|---|---|---|---|---|---|"]
        for mode, row in mem["figures"].items():
            mb = row.get("micro_batch") or {}
            lines.append(f"| {mode} | {mb.get('rows', '?')} rows, {mb.get('tokens_slots', '?')} tokens, "
                         f"{mb.get('tokens_labels', '?')} labelled | {_gib(row['estimate_bytes'])} | "
                         f"{_gib(row['measured_bytes'])} | {_f(row['error'], '+.1%')} | "
                         f"{_gib(row.get('worst_case_bytes'))} |")
    for name in ("fsdp-sft", "fsdp-dpo"):
        f = results.get(name, {}).get("figures", {})
        if "losses" in f:
            lines += ["", f"{name}: losses {[round(x, 5) for x in f['losses']]} vs plain "
                      f"{[round(x, 5) for x in f['plain_losses']]} (max relative difference "
                      f"{_f(f.get('max_relative_loss_difference'), '.2g')}, tolerance {f.get('tolerance')}); "
                      f"Accelerate: {f.get('distributed_type')}; peak GPU memory {_gib(f.get('peak_gpu_bytes'))}."]
        for refusal in f.get("refusals", []):
            lines.append(f"{name}: refused with `{' '.join(refusal['overrides'])}`: {refusal['ft validate'][-300:]}")
    if env.get("modules"):
        mods = ", ".join(f"{k} {v.get('version') or v.get('error', '?')} ({v.get('from', '-')})"
                         for k, v in env["modules"].items())
        lines += ["", f"Packages (where from): {mods}.", f"bitsandbytes library: {env.get('bitsandbytes_library')}."]
        if env.get("unmet_requirements"):
            lines.append("Requirements not met: " + "; ".join(env["unmet_requirements"]) + ".")
    return "\n".join(lines) + "\n"


def write(out: Path, state: dict, results: dict[str, dict], steps: tuple, derived: dict) -> None:
    """Rewrite OUT/summary.json and OUT/summary.md."""
    data = {"check": state, "steps": results}
    _write_atomic(out / "summary.json", json.dumps(data, indent=1, default=str))
    _write_atomic(out / "summary.md", markdown(state, results, steps, derived))
