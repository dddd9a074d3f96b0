"""The real-model figures (README "A real model"): held-out gain against forgetting, per run and stage, as a table
and a plot.

    .venv/bin/python scripts/real_model_report.py runs/smollm2-sft runs/smollm2-sft-2ep runs/smollm2-sft-2ep-lr3e-4 \
        runs/smollm2-sft-attn runs/smollm2-sft-dpo-grpo --out bench/real-model \
        --point "smollm2-sft-lr2e-4=SFT all-linear, r16, lr 0.0002, 1 ep (exact match by ft eval),0.0187,0.0329,0.12"

Reads each run folder's `summary.json` (every stage's held-out exact match before and after, its forgetting on
`eval.general_text`, its wall time) and `recipe.yaml` (what differed); writes OUT.md (the table) and OUT.png
(exact-match gain against the general-text loss change, with the recipe's `eval.max_forgetting` as a line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ATTENTION, MLP = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}


def _targets(targets: str | list[str] | None) -> str:
    """`lora.target_modules` in a word: all-linear, attention, MLP, or the list itself."""
    if not isinstance(targets, list):
        return str(targets)
    names = set(targets)
    return "attention" if names <= ATTENTION else "MLP" if names <= MLP else "all-linear" if names == ATTENTION | MLP \
        else "+".join(targets)


def _label(run: Path, stage: str, recipe: dict) -> str:
    lora, training = recipe.get("lora", {}), recipe.get("training", {})
    if stage != "sft":
        return stage.upper()
    sources = (recipe.get("data") or {}).get("train", [])
    rows = " + ".join(f"{s.get('max_samples') or 'all'} {Path(s.get('path', '?')).stem}" for s in sources)
    variant = "".join(f", {name}" for name, key in (("rsLoRA", "use_rslora"), ("DoRA", "use_dora")) if lora.get(key))
    return (f"SFT {_targets(lora.get('target_modules'))}, r{lora.get('r')}{variant}, "
            f"lr {training.get('learning_rate'):g}, {rows} x {training.get('epochs'):g} ep")


def rows_of(run: Path) -> list[dict]:
    summary = json.loads((run / "summary.json").read_text())
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    argv = manifest.get("command") or []
    command = " ".join(["ft" if argv[0].endswith("__main__.py") else argv[0], *argv[1:]]) if argv else ""
    out = []
    for stage, done in summary.get("stages", {}).items():
        m = done.get("metrics", {})
        before, after = m.get("task_before") or {}, m.get("task_after") or {}
        held = m.get("held_out_before") or {}
        if not after and "held_out_after" in m:  # alignment stages name it this way
            before, after = held, m["held_out_after"]
        forgetting = m.get("forgetting") or {}
        out.append({"run": run.name, "stage": stage, "label": _label(run, stage, recipe),
                    "before": before.get("exact_match"), "after": after.get("exact_match"),
                    "loss_change": forgetting.get("loss_change"), "mean_kl": forgetting.get("mean_kl"),
                    "seconds": m.get("stage_seconds"), "limit": (recipe.get("eval") or {}).get("max_forgetting"),
                    "command": command})
    return out


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def table(rows: list[dict]) -> str:
    lines = ["| run | stage | held-out exact match | forgetting: loss change (nats/token) | mean KL | stage wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['label']} | {_pct(r['before'])} -> {_pct(r['after'])} | "
                     f"{r['loss_change']:+.3f} | {r['mean_kl']:.3f} | {r['seconds'] or 0:.0f} s |"
                     if r["loss_change"] is not None else
                     f"| {r['run']} | {r['label']} | {_pct(r['before'])} -> {_pct(r['after'])} | | | "
                     f"{r['seconds'] or 0:.0f} s |")
    commands = {r["run"]: r["command"] for r in rows if r.get("command")}
    if commands:
        lines += ["", "Commands (from each run's manifest.json):", ""]
        lines += [f"- {run}: `{command}`" for run, command in commands.items()]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, goal_gain: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5))
    points = [r for r in rows if r["loss_change"] is not None and r["after"] is not None]
    for n, r in enumerate(points, 1):  # numbered on the plot, named in the legend: labels would overlap
        ax.scatter(r["loss_change"], 100 * r["after"], s=40, label=f"{n}. {r['run']}: {r['label']}")
        ax.annotate(str(n), (r["loss_change"], 100 * r["after"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=8)
    limit = next((r["limit"] for r in rows if r["limit"]), None)
    if limit:
        ax.axvline(limit, ls="--", c="grey", lw=1)
        ax.text(limit, 5, " eval.max_forgetting", fontsize=7, color="grey")
    if goal_gain:
        ax.axhline(100 * goal_gain, ls=":", c="grey", lw=1)
        ax.text(0.001, 100 * goal_gain + 1, f"goal: {100 * goal_gain:.0f}-point gain", fontsize=7, color="grey")
    ax.set_xlabel("forgetting: general-text loss change vs base (nats/token, Python docs prose)")
    ax.set_ylabel("held-out exact match after (%, was 0%)")
    ax.set_title("SmolLM2-135M-Instruct (QLoRA from GGUF): task gain against forgetting", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/real-model"))
    ap.add_argument("--point", action="append", default=[], metavar="RUN=LABEL,LOSS_CHANGE,MEAN_KL,EXACT_MATCH",
                    help="a measured point of a run without a finished summary (e.g. read off `ft eval`)")
    ap.add_argument("--goal-gain", type=float, default=0.60, help="the exact-match gain aimed at, drawn as a line")
    args = ap.parse_args(argv)
    rows, seen = [], set()
    for r in (r for run in args.runs for r in rows_of(run)):  # a copied stage (the same SFT) is listed once
        if (r["label"], r["after"], r["loss_change"]) not in seen:
            seen.add((r["label"], r["after"], r["loss_change"]))
            rows.append(r)
    for point in args.point:
        run, rest = point.split("=", 1)
        label, loss_change, kl, exact = rest.rsplit(",", 3)
        rows.append({"run": run, "stage": "sft", "label": label, "before": 0.0, "after": float(exact),
                     "loss_change": float(loss_change), "mean_kl": float(kl), "seconds": None, "limit": None})
    text = table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    plot(rows, args.out.with_suffix(".png"), args.goal_gain)
    print(text)


if __name__ == "__main__":
    main()
