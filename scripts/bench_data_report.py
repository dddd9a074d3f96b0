"""bench/data.md and bench/data.png from the summary `scripts/bench_data.py` measured (see its docstring)."""

from __future__ import annotations

from pathlib import Path


def _goal(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each with the figure measured and whether it is met (or not measured at these sizes)."""
    chat = [r for r in results if r["kind"] == "chat"]
    lines = []
    if len(chat) >= 2:
        small, large = chat[0], chat[-1]
        grow = large["ours"]["rss_mb"] - small["ours"]["rss_mb"]
        anon = large["ours"]["anon_rss_mb"] - small["ours"]["anon_rss_mb"]
        full = small["rows"] <= 10_000 and large["rows"] >= 1_000_000
        verdict = f"{_goal(grow <= 300)} (anonymous: {_goal(anon <= 300)})" if full else "measured range only"
        lines.append(f"- peak RSS growth {small['rows']:,} -> {large['rows']:,} rows: {grow:+.0f} MB, anonymous "
                     f"memory {anon:+.0f} MB (goal: at most +300 MB from 10k to 1M rows): {verdict}")
    big = [r for r in chat if r["rows"] >= 1_000_000 and "first_step_warm_s" in r]
    warm = big[0]["first_step_warm_s"] if big else None
    lines.append(f"- warm-cache time to first step at 1M rows: {warm if warm is not None else '-'} s (goal < 10 s): "
                 f"{_goal(None if warm is None else warm < 10)}")
    streams = [r["first_step_stream_s"] for r in chat if "first_step_stream_s" in r]
    worst = max(streams, default=None)
    lines.append(f"- streaming time to first step, worst size: {worst if worst is not None else '-'} s (goal < 15 s): "
                 f"{_goal(None if worst is None else worst < 15)}")
    ratios = [r["speedup"] for r in results if "speedup" in r]
    lines.append(f"- preprocessing tokens/s, ours / trl: {', '.join(f'{x:.2f}x' for x in ratios)} (goal >= 1.5x): "
                 f"{_goal(min(ratios) >= 1.5) if ratios else 'not measured'}")
    return lines


def table(results: list[dict]) -> list[str]:
    lines = ["| data | rows | MB | ours s | ours tok/s | ours RSS MB: peak / anon / worker | trl s | trl tok/s | "
             "trl RSS MB: peak / anon / worker | ours/trl | 1st step cold s | warm s | streaming s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def rss(side: dict) -> str:
        return f"{side['rss_mb']:.0f} / {side['anon_rss_mb']:.0f} / {side['worker_rss_mb']:.0f}"

    for r in results:
        o, t = r["ours"], r.get("trl")
        first = [str(r.get(k, "-")) for k in ("first_step_cold_s", "first_step_warm_s", "first_step_stream_s")]
        trl = f"{t['seconds']} | {t['tokens_per_s']:,} | {rss(t)} | {r['speedup']:.2f}x" if t else "- | - | - | -"
        lines.append(f"| {r['name']} | {r['rows']:,} | {r['bytes'] / 1e6:.0f} | {o['seconds']} | {o['tokens_per_s']:,} "
                     f"| {rss(o)} | {trl} | " + " | ".join(first) + " |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chat = [r for r in results if r["kind"] == "chat"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("ours", "o-"), ("trl", "s--")):
        have = [r for r in chat if side in r]
        a.plot([r["rows"] for r in have], [r[side]["seconds"] for r in have], style, label=f"{side} preprocessing")
        b.plot([r["rows"] for r in have], [r[side]["rss_mb"] for r in have], style, label=f"{side} peak RSS")
        b.plot([r["rows"] for r in have], [r[side]["anon_rss_mb"] for r in have], style, alpha=0.5,
               label=f"{side} peak anonymous RSS")
    for key, style in (("first_step_cold_s", "^:"), ("first_step_warm_s", "v:"), ("first_step_stream_s", "d:")):
        have = [r for r in chat if key in r]
        if have:
            a.plot([r["rows"] for r in have], [r[key] for r in have], style,
                   label=key.replace("_s", "").replace("_", " "))
    for ax, label in ((a, "seconds"), (b, "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chat rows")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_title("time against size")
    b.set_title("peak memory against size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict, out: Path) -> None:
    """Write data.md (table, goals, command) and data.png (cost against size) into `out`."""
    results = summary["results"]
    plot(results, out / "data.png")
    text = ["# Data path at growing sizes (scripts/bench_data.py)", "",
            f"Command: `{summary['command']}` ({summary['threads']} processes/threads for every side).", "",
            *table(results), "", "Preprocessing seconds of every run (alternating sides; the table shows the median):",
            "", *[f"- {r['name']}: " + "; ".join(f"{side} {r[side].get('runs_s', [r[side]['seconds']])}"
                                                  for side in ("ours", "trl") if side in r) for r in results],
            *[f"- {r['name']}: the first start on the cache the preprocessing run filled (it also runs the checks "
              f"before training and records the file as checked): {r['first_step_unchecked_s']} s"
              for r in results if "first_step_unchecked_s" in r],
            "", "Goals of issue 15:", "", *goals(results), "", "![cost against size](data.png)", ""]
    (out / "data.md").write_text("\n".join(text), encoding="utf-8")
