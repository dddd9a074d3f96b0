"""The evaluation part of a run's report: `ft eval` figures (`<run>/eval/<stage>.json`) as tables and a bar chart,
answers generated during training (`<stage>/samples.jsonl`) as a table per step, and the forgetting mark."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from finetune.eval.table import flatten, forgetting_mark
from finetune.run.files import read_json


def eval_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{stage: the JSON `ft eval` wrote} for every evaluated stage of a run."""
    folder = Path(run_dir) / "eval"
    return {p.stem: read_json(p, {}) or {} for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def forgetting_marks(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """'stage: forgetting: ...' for every stage whose forgetting (at the end of training or in `ft eval`) is over
    `eval.max_forgetting`."""
    marks = {}
    for stage, done in (summary.get("stages") or {}).items():
        mark = forgetting_mark(done.get("metrics") or {})
        if mark:
            marks[stage] = mark
    for stage, result in eval_results(run_dir).items():
        mark = forgetting_mark(result.get("target") or {})
        if mark:
            marks[stage] = mark  # `ft eval` is the later measurement
    return [f"{stage}: {mark}" for stage, mark in marks.items()]


def eval_charts(run_dir: Path, folder: Path) -> dict[str, list[tuple[str, str]]]:
    """One bar chart per evaluated stage of its rates (task metrics, preference accuracy), target vs against."""
    made: dict[str, list[tuple[str, str]]] = {}
    for stage, result in eval_results(run_dir).items():
        mine, theirs = flatten(result.get("target") or {}), flatten(result.get("against") or {})
        keys = [k for k in mine if k.startswith(("task", "preference")) and "margin" not in k]
        if not keys:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 0.4 * len(keys) + 1.2), dpi=110)
        try:
            y = list(range(len(keys)))
            ax.barh([i + (0.2 if theirs else 0) for i in y], [mine[k] for k in keys], height=0.4, label="target")
            if theirs:
                ax.barh([i - 0.2 for i in y], [theirs.get(k, 0) for k in keys], height=0.4, label="against")
                ax.legend(fontsize=8)
            ax.set_yticks(y, keys, fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_title(f"{stage}: ft eval")
            fig.tight_layout()
            name = f"eval-{''.join(c if c.isalnum() or c in '-_' else '_' for c in stage)}.png"
            fig.savefig(folder / name)
        finally:
            plt.close(fig)
        made[stage] = [(name, "ft eval: rates")]
    return made


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    e = html.escape
    return (["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
            + ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows] + ["</table>"])


def eval_sections(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """HTML: forgetting marks, `ft eval` tables, and the generated answers per step."""
    parts = [f"<p class='error'><b>FORGETTING</b> {html.escape(m)}</p>" for m in forgetting_marks(run_dir, summary)]
    for stage, result in eval_results(run_dir).items():
        mine, theirs = flatten(result.get("target") or {}), flatten(result.get("against") or {})
        header = ["metric", "target"] + (["against"] if theirs else [])
        rows = [[k, f"{v:.4f}"] + ([f"{theirs[k]:.4f}" if k in theirs else "-"] if theirs else [])
                for k, v in mine.items()]
        parts.append(f"<h2>ft eval: stage {html.escape(stage)}</h2>")
        parts.append(f"<p>{html.escape(str((result.get('target') or {}).get('model', '')))}</p>")
        parts += _table(header, rows)
    for path in sorted(Path(run_dir).glob("*/samples.jsonl")):
        stage = path.parent.name
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts.append(f"<h2>Answers during training: stage {html.escape(stage)}</h2>")
        parts += _table(["step", "prompt", "expected", "generated"],
                        [[str(s["step"]), s["prompt"], s["answer"], s["generated"]] for s in samples])
    return parts
