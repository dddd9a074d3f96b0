"""The figures of `ft eval` as rows (`flatten`) and as a plain text table (`format_table`); no torch here, so the
report and `ft runs` can read them."""

from __future__ import annotations

from typing import Any

PARTS = (("heldout", ("loss", "perplexity")),
         ("forgetting", ("loss_change", "mean_kl", "loss", "base_loss")),
         ("general", ("loss", "perplexity")))
PREFERENCE = ("accuracy", "margin", "reward_accuracy", "reward_margin")


def flatten(figures: dict[str, Any]) -> dict[str, float]:
    """`{"task sft_eval.jsonl exact_match": 0.95, "forgetting mean_kl": 0.01, ...}`: every number of one side."""
    out: dict[str, float] = {}
    for part, keys in PARTS:
        for key in keys:
            value = (figures.get(part) or {}).get(key)
            if isinstance(value, (int, float)):
                out[f"{part} {key}"] = float(value)
    for path, metrics in (figures.get("tasks") or {}).items():
        name = path.rsplit("/", 1)[-1]
        out.update({f"task {name} {k}": float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and k != "rows"})
    for path, metrics in (figures.get("preference") or {}).items():
        name = path.rsplit("/", 1)[-1]
        out.update({f"preference {name} {k}": float(metrics[k]) for k in PREFERENCE if k in metrics})
    return out


def forgetting_mark(figures: dict[str, Any]) -> str | None:
    """'forgetting: loss +0.31 > 0.2 allowed' when the figures exceed `eval.max_forgetting`, else None."""
    f = figures.get("forgetting") or {}
    if f.get("over_limit"):
        return f"forgetting: general-text loss {f['loss_change']:+.4f} > {f['max_forgetting']} allowed"
    return None


def format_table(result: dict[str, Any]) -> str:
    """Metric, target, and with `--against` the other model and the difference (target - other)."""
    mine, theirs = flatten(result["target"]), flatten(result.get("against") or {})
    header = ["metric", "target"] + (["against", "target - against"] if result.get("against") else [])
    rows = [header]
    for key in list(mine) + [k for k in theirs if k not in mine]:
        row = [key, f"{mine[key]:.4f}" if key in mine else "-"]
        if result.get("against"):
            row.append(f"{theirs[key]:.4f}" if key in theirs else "-")
            row.append(f"{mine[key] - theirs[key]:+.4f}" if key in mine and key in theirs else "-")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    comparison = result.get("comparison") or {}
    if "mean_kl" in comparison:
        lines.append(f"mean KL(against || target) per token on {comparison.get('file')}: {comparison['mean_kl']:.4g}"
                     + (f" (on the {comparison['common_vocab']} vocabulary rows both models have)"
                        if "common_vocab" in comparison else ""))
    if comparison.get("kl_refused"):
        lines.append(f"KL comparison refused: {comparison['kl_refused']}")
    for side in ("target", "against"):
        base = ((result.get(side) or {}).get("forgetting") or {}).get("base")
        if base:
            lines.append(f"{side}: forgetting measured against {base}")
        mark = forgetting_mark(result.get(side) or {})
        if mark:
            lines.append(f"{side}: FORGETTING, {mark}")
    return "\n".join(lines)
