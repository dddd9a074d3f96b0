"""`ft report RUN_DIR`: the curves of a run as PNG files and one HTML page, from metrics.jsonl alone.

Per stage: training loss (raw and smoothed) with the eval loss, learning rate, gradient norm, tokens per second, and
for DPO stages the rewards of chosen and rejected answers, their margin and the reward accuracy (train and eval).
The page adds the run's status, each stage's results and the lineage from manifest.json. Everything is written to
`RUN_DIR/report/` (built under a temporary name, then renamed), so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.run.files import read_json, write_dir_atomic
from finetune.run.records import read_metrics, redact_text

Series = dict[str, tuple[list[int], list[float]]]

# (file suffix, title, y label, [(metrics key, legend label)], log scale)
CHARTS: list[tuple[str, str, str, list[tuple[str, str]], bool]] = [
    ("loss", "Loss", "loss", [("loss", "train"), ("eval_loss", "eval")], False),
    ("learning_rate", "Learning rate", "learning rate", [("learning_rate", "learning rate")], False),
    ("grad_norm", "Gradient norm (before clipping)", "global L2 norm", [("grad_norm", "grad norm")], True),
    ("tokens_per_second", "Throughput", "tokens / s", [("tokens_per_second", "tokens/s")], False),
    ("rewards", "DPO rewards", "reward (beta x log-ratio)",
     [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin"),
      ("eval_rewards/chosen", "eval chosen"), ("eval_rewards/rejected", "eval rejected"),
      ("eval_rewards/margins", "eval margin")], False),
    ("task", "Task metrics on a sample of task_eval", "rate",
     [("task_exact_match", "exact match"), ("task_contains_answer", "contains answer"),
      ("task_concise_rate", "concise")], False),
    ("reward_accuracy", "DPO reward accuracy", "share of pairs with chosen > rejected",
     [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")], False),
]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice keeps its last value."""
    points = {r["step"]: float(r[key]) for r in rows if key in r and isinstance(r.get(key), (int, float))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Debiased exponential moving average (what TensorBoard's smoothing slider does)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot(path: Path, title: str, ylabel: str, lines: Series, log_scale: bool = False) -> None:
    """One PNG chart of the given series against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in threads and on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    try:
        for label, (steps, values) in lines.items():
            eval_line = label.startswith("eval")
            if label == "train" and len(values) > 10:  # raw loss is noisy: show it faint, with a smoothed line
                ax.plot(steps, values, color="C0", alpha=0.25, linewidth=1)
                ax.plot(steps, smooth(values), color="C0", label="train (smoothed)")
            else:
                ax.plot(steps, values, marker="o" if eval_line or len(values) < 20 else None, markersize=3,
                        linestyle="--" if eval_line else "-", label=label)
        if log_scale and all(v > 0 for _, values in lines.values() for v in values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or "train" in lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def stage_charts(rows: list[dict[str, Any]], stage: str, folder: Path) -> list[tuple[str, str]]:
    """Draw every chart a stage has data for into `folder`. Returns (file name, title) pairs."""
    mine = [r for r in rows if r.get("stage") == stage]
    made = []
    for suffix, title, ylabel, keys, log_scale in CHARTS:
        lines = {label: series(mine, key) for key, label in keys}
        lines = {label: s for label, s in lines.items() if s[0]}
        if not lines:
            continue
        name = f"{_safe(stage)}-{suffix}.png"
        plot(folder / name, f"{stage}: {title}", ylabel, lines, log_scale)
        made.append((name, title))
    return made


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN_DIR/report/` (PNGs + index.html) and return the page's path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FinetuneError(f"{run_dir}: no metrics.jsonl; give a run folder written by `ft train`")
    rows = read_metrics(metrics)
    if not rows:
        raise FinetuneError(f"{metrics} has no rows yet; the run logs its first metrics after `logging_steps` steps")
    stages = list(dict.fromkeys(r.get("stage", "?") for r in rows))
    charts: dict[str, list[tuple[str, str]]] = {}

    def fill(tmp: Path) -> None:
        from finetune.run.evalpage import eval_charts

        for stage in stages:
            charts[stage] = stage_charts(rows, stage, tmp)
        for stage, made in eval_charts(run_dir, tmp).items():
            charts.setdefault(stage, []).extend(made)
        (tmp / "index.html").write_text(page(run_dir, rows, charts), encoding="utf-8")

    write_dir_atomic(run_dir / "report", fill)
    return run_dir / "report" / "index.html"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def inline_html(text: str) -> str:
    """Escaped HTML of a line written in Markdown's inline style: `code` spans become <code> elements."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def page(run_dir: Path, rows: list[dict[str, Any]], charts: dict[str, list[tuple[str, str]]]) -> str:
    """The HTML page: status, stage results, lineage, then every chart."""
    from finetune.run.listing import run_info

    info = run_info(run_dir)
    summary = read_json(run_dir / "summary.json", {}) or {}
    manifest = read_json(run_dir / "manifest.json", None)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(str(info['name']))}: finetune report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%;border:1px solid #eee}.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}"
        ".error{color:#a00;white-space:pre-wrap}</style></head><body>",
        f"<h1>{e(str(info['name']))}</h1>",
        f"<p>run folder <code>{e(str(run_dir))}</code>; status <b>{e(info['status'])}</b>; "
        f"{len(rows)} metrics rows</p>",
    ]
    if summary.get("error"):
        parts.append(f"<p class='error'>{inline_html(redact_text(summary['error']))}</p>")
    stage_results = summary.get("stages") or {}
    if stage_results:
        parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>result</th></tr>")
        for name, done in stage_results.items():
            metrics = {k: v for k, v in (done.get("metrics") or {}).items() if not isinstance(v, (list, dict))
                       or k.startswith(("task_", "eval_"))}
            parts.append(f"<tr><td>{e(name)}</td><td>{e(str(done.get('kind', '')))}</td>"
                         f"<td>{e('; '.join(f'{k}: {_fmt(v)}' for k, v in metrics.items()))}</td></tr>")
        parts.append("</table>")
    from finetune.run.evalpage import eval_sections

    parts += eval_sections(run_dir, summary)
    if manifest:
        from finetune.run.manifest import lineage_lines

        parts.append("<h2>Lineage</h2><ul>")
        parts += [f"<li>{inline_html(line[2:])}</li>" for line in lineage_lines(manifest)]
        parts.append("</ul>")
    for stage, made in charts.items():
        parts.append(f"<h2>Stage {e(stage)}</h2><div class='grid'>")
        parts += [f"<figure><img src='{e(name)}' alt='{e(title)}'><figcaption>{e(title)}</figcaption></figure>"
                  for name, title in made]
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
