"""`ft runs`: what is in a folder of runs, and which run folders are being written right now.

A run's status comes from its summary.json (running, finished, interrupted, failed). A run that says "running" while
nobody holds its `.lock` died without a word (kill -9, out of memory, power cut): it is shown as `crashed`, and
`ft train RUN --resume` continues it from its last checkpoint. Nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.run.files import read_json
from finetune.run.lock import is_locked
from finetune.run.records import redact_text


def _rows(path: Path) -> list[dict[str, Any]]:
    from finetune.run.records import read_metrics

    return read_metrics(path)


def run_info(run_dir: Path) -> dict[str, Any]:
    """Status, current stage, last step, last loss and eval metric of one run folder."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json", {}) or {}
    status = summary.get("status", "unknown")
    if status == "running" and not is_locked(run_dir):
        status = "crashed"
    rows = _rows(run_dir / "metrics.jsonl")
    stage = summary.get("stopped_in") or (rows[-1]["stage"] if rows else None)
    if stage is None and summary.get("stages"):
        stage = list(summary["stages"])[-1]
    mine = [r for r in rows if r.get("stage") == stage]
    losses = [r["loss"] for r in mine if "loss" in r]
    info: dict[str, Any] = {
        "run": str(run_dir),
        "name": summary.get("name", run_dir.name),
        "status": status,
        "stage": stage,
        "step": max((r.get("step", 0) for r in mine), default=None),
        "loss": losses[-1] if losses else None,
        "eval": _eval_metric(mine, (summary.get("stages") or {}).get(stage, {})),
        "updated": max((p.stat().st_mtime for p in (run_dir / "summary.json", run_dir / "metrics.jsonl")
                        if p.exists()), default=None),
    }
    from finetune.run.evalpage import forgetting_marks

    info["forgetting"] = forgetting_marks(run_dir, summary)
    if summary.get("error") and status in ("failed", "interrupted"):
        info["error"] = redact_text(summary["error"].splitlines()[0])  # runs recorded before the rule knew a shape
    return info


def _eval_metric(rows: list[dict[str, Any]], stage_summary: dict[str, Any]) -> str | None:
    """The most telling held-out number: task exact match, else DPO reward accuracy, else eval loss."""
    after = (stage_summary.get("metrics") or {}).get("task_after")
    if after and "exact_match" in after:
        return f"exact match {after['exact_match']:.1%}"
    for key, label, fmt in (("eval_rewards/accuracies", "reward acc", "{:.1%}"), ("eval_loss", "eval loss", "{:.4f}")):
        values = [r[key] for r in rows if key in r]
        if values:
            return f"{label} {fmt.format(values[-1])}"
    return None


def find_runs(folder: Path) -> list[Path]:
    """`folder` itself when it is a run folder, else the run folders directly inside it (newest first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"{folder} is not a folder")
    if (folder / "summary.json").exists():
        return [folder]
    found = [p for p in folder.iterdir() if p.is_dir() and (p / "summary.json").exists()]
    return sorted(found, key=lambda p: (p / "summary.json").stat().st_mtime, reverse=True)


def _age(mtime: float | None) -> str:
    if mtime is None:
        return "-"
    seconds = max(0, time.time() - mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def format_table(infos: list[dict[str, Any]]) -> str:
    """A plain aligned table, one run per line (errors of stopped runs on an indented line below)."""
    header = ("RUN", "STATUS", "STAGE", "STEP", "LOSS", "EVAL", "UPDATED")
    lines = [header]
    for i in infos:
        lines.append((i["run"], i["status"], i["stage"] or "-", "-" if i["step"] is None else str(i["step"]),
                      "-" if i["loss"] is None else f"{i['loss']:.4f}",
                      (i["eval"] or "-") + (" FORGETTING" if i.get("forgetting") else ""), _age(i["updated"])))
    widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
    out = []
    for row, info in zip(lines, [None, *infos], strict=True):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if info and info.get("error"):
            out.append(f"    {info['error']}")
        out += [f"    {mark}" for mark in (info or {}).get("forgetting") or []]
    return "\n".join(out)


def tidy(folder: Path) -> list[str]:
    """`ft runs --tidy`: delete what killed commands left in each run folder (`folder.remove_temporaries`: half-written
    checkpoints and files, a killed export's folder and its float32 `.merged` model), skipping runs in use."""
    from finetune.run.folder import remove_temporaries
    from finetune.run.lock import RunLock

    lines = []
    for run_dir in find_runs(folder):
        try:
            lock = RunLock(run_dir).acquire()  # nobody trains, exports, evaluates or generates from it meanwhile
        except (FinetuneError, OSError):
            lines.append(f"tidy: {run_dir} is in use (or cannot be written); left as it is")
            continue
        try:
            removed = remove_temporaries(run_dir)
        finally:
            lock.release()
        if removed:
            names = ", ".join(str(p.relative_to(run_dir)) for p in removed[:6]) + (" ..." if len(removed) > 6 else "")
            lines.append(f"tidy: {run_dir}: removed {len(removed)} leftover(s) of killed commands ({names})")
    return lines


def list_runs(folder: Path, as_json: bool = False) -> str:
    """The text `ft runs` prints."""
    infos = [run_info(p) for p in find_runs(folder)]
    if as_json:
        return json.dumps(infos, indent=2)
    if not infos:
        return f"no runs in {folder}"
    return format_table(infos)
