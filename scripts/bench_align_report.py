"""The markdown table of `bench_align.py` (kto, grpo): medians per side, ratios ours / theirs, GRPO's phases."""

from __future__ import annotations

import json
import statistics


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def by_side(summary: dict) -> dict[str, dict]:
    """Side -> medians of its runs (phases: medians per phase)."""
    out = {}
    for side in summary["meta"]["sides"]:
        rows = [r for r in summary["runs"] if r["side"] == side]
        if not rows:
            continue
        keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        med = {k: _median(rows, k) for k in keys}
        med["n"] = len(rows)
        if "phases" in rows[0]:
            med["phases"] = {p: statistics.median(r["phases"][p] for r in rows) for p in rows[0]["phases"]}
        out[side] = med
    return out


def markdown(summary: dict) -> str:
    meta, sides = summary["meta"], by_side(summary)
    mode = meta["mode"]
    rate, unit = ("completions_per_second", "completions/s") if mode == "grpo" else ("rows_per_second", "rows/s")
    lines = [f"# Benchmark ({mode}): {meta['preset']} preset, {meta['reps']} repetitions, medians", "",
             f"Command: `{meta['command']}`", ""]
    head = ["side", unit, "wall s", "train s", "first step s", "peak RSS MB (largest process)", "process tree MB",
            "steps", "final train loss"]
    if mode == "grpo":
        head[2:2] = ["completion tok/s", "mean completion length"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, m in sides.items():
        name = side + (f" ({m['n']} run)" if m["n"] == 1 and meta["reps"] > 1 else "")
        row = [name, _fmt(m.get(rate), 3), _fmt(m["wall_seconds"], 1), _fmt(m["train_seconds"], 1),
               _fmt(m["time_to_first_step"], 1), _fmt(m["peak_rss_mb"], 0), _fmt(m["tree_peak_rss_mb"], 0),
               _fmt(m["steps"], 0), _fmt(m.get("final_train_loss"), 4)]
        if mode == "grpo":
            row[2:2] = [_fmt(m.get("completion_tokens_per_second"), 1), _fmt(m.get("mean_completion_length"), 1)]
        lines.append("| " + " | ".join(row) + " |")
    ours = sides.get("ours")
    if ours:
        lines += ["", f"Ratios ours / theirs ({unit}: higher is better; time and memory: lower is better):", "",
                  f"| vs | {unit} | wall | train | first step | peak RSS | tree RSS |", "|---|---|---|---|---|---|---|"]
        for side, m in sides.items():
            if side == "ours":
                continue
            r = [ours[k] / m[k] if m.get(k) else None for k in (rate, "wall_seconds", "train_seconds",
                                                                  "time_to_first_step", "peak_rss_mb",
                                                                  "tree_peak_rss_mb")]
            lines.append(f"| {side} | " + " | ".join(f"{x:.2f}x" if x else "-" for x in r) + " |")
    if mode == "grpo":
        lines += ["", "Where GRPO's time goes (seconds of the training loop, median; trl's profiler): generation "
                  "(`transformers.generate`), scoring (the reward functions), log-prob forwards before the loss "
                  "(reference policy, tokenizing, padding), training step (loss forward, backward, optimizer):", "",
                  "| side | generation | scoring | log-prob forwards | training step |", "|---|---|---|---|---|"]
        for side, m in sides.items():
            ph = m["phases"]
            total = sum(ph.values()) or 1.0
            lines.append(f"| {side} | " + " | ".join(f"{ph[p]:.1f} ({ph[p] / total:.0%})" for p in
                                                     ("generation", "scoring", "logprob_forwards", "train_step"))
                         + " |")
    load = meta["load_average"]
    lines += ["", f"Work on every side: {json.dumps(meta['work'])}.",
              f"Threads per run: {meta['threads']}. Load average (1/5/15 min) before "
              f"{tuple(round(x, 1) for x in load['before'])}, after {tuple(round(x, 1) for x in load['after'])} "
              f"on {meta['cpus']} CPUs (shared machine)."]
    return "\n".join(lines) + "\n"
