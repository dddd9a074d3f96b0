"""Long context: training memory and speed against sample length, `ft train` and `trl sft` side by side.

    .venv/bin/python scripts/bench_context.py --cap 8GB                          # 32k-vocab Llama, 1k..32k tokens
    .venv/bin/python scripts/bench_context.py --preset smollm2 --lengths 1024,4096 # the real SmolLM2-135M
    .venv/bin/python scripts/bench_context.py --preset tiny --lengths 256,512 --cap 2GB   # smoke run

One sample per micro-batch, every sample exactly `length` tokens (rows longer than that, cut by each side's
`max_length`), a user turn and a long assistant answer (loss on the answer), 4-bit NF4 base, LoRA r 16 on every
projection, float32 compute, the same thread count for every process. Per length and side, one process runs
`--steps` optimizer steps from the shell command a user would type; measured: peak RSS of the process (wait4), and
seconds per optimizer step (the probe's step times, `bench_probe.py`). Lengths go up until a side fails or passes
the memory cap (its process is stopped when its memory passes `--cap`); longer lengths are not tried for that side.

Sides: `ours` (the recipe's long-context settings: gradient checkpointing, `training.tiled_mlp: auto`, label-only
loss head), `ours-plain` (no checkpointing, no tiling), `trl-best` (trl's most memory-frugal flags that run here:
gradient checkpointing, no bf16 autocast; one sample per micro-batch has no padding for padding-free to drop), and
`trl-default` (trl's defaults: bf16 autocast, gradient checkpointing).

Outputs in --out (default bench/): context.json, context.md (table, longest length within the cap per side, ratios)
and context.png (peak memory against length, both sides, the cap drawn), or the --tag stem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_assets import PRESETS, build_assets, make_rows, write_jsonl  # noqa: E402
from bench_proc import child_env, run_measured, write_probe_hook  # noqa: E402
from bench_train import ours_command, trl_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "ours-plain", "trl-best", "trl-default")
OURS_SET = {"ours": ["training.gradient_checkpointing=true", "training.tiled_mlp=auto"],
            "ours-plain": ["training.gradient_checkpointing=false", "training.tiled_mlp=off"]}
# one sample per micro-batch has no padding to drop: trl's padding_free (which would also stop enforcing max_length)
# changes nothing here
TRL_FLAGS = {"trl-best": {"bf16": False, "gradient_checkpointing": True},
             "trl-default": {}}


def parse_size(text: str) -> int:
    from finetune.stages.length_search import parse_size as parse

    return parse(text)


def long_rows(preset: str, words: list[str] | None, length: int, n: int, seed: int) -> list[dict]:
    """`n` chat rows of at least `length` tokens: a short question and a long answer (cut to `length` by both sides).

    The word-level presets count one token per word; the real model's rows are Python's documentation prose (about 4
    characters per token, 6 taken to be sure)."""
    rng = random.Random(seed)
    if words is not None:
        p = dataclasses.replace(PRESETS[preset], min_len=length + 64, max_len=length + 64, median_len=length + 64)
        rows = make_rows(words, p, n, rng)
        for row in rows:  # a short question, then the answer: the labelled share stays about the same at every length
            user, answer = row["messages"]
            text = (user["content"] + " " + answer["content"]).split()
            user["content"], answer["content"] = " ".join(text[:16]), " ".join(text[16:])
        return rows
    from pydoc_data.topics import topics

    prose = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    rows = []
    for _ in range(n):
        start = rng.randrange(0, max(1, len(prose) - 6 * length))
        rows.append({"messages": [{"role": "user", "content": "Recite Python's documentation from here on."},
                                  {"role": "assistant", "content": prose[start:start + 6 * length]}]})
    return rows


def run_one(side: str, length: int, args: argparse.Namespace, assets: dict, probe_dir: Path) -> dict:
    run = Path(args.work) / "runs" / f"{args.preset}-{side}-{length}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    data = write_jsonl(run / "data" / "train.jsonl",
                       long_rows(args.preset, assets.get("words"), length, args.steps, seed=length))
    here = {**assets, "train": str(data), "train_dir": str(data.parent)}
    w = {"mode": "sft", "max_length": length, "micro_batch": 1, "grad_accum": 1, "lr": 2e-4, "scheduler": "constant",
         "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "targets": "all-linear", "seed": 42, "epochs": 1,
         "optimizer": "adamw_torch", "trl_flags": {k: {**v, "max_length": length} for k, v in TRL_FLAGS.items()}}
    cmd = (ours_command(run, here, w, args.steps, OURS_SET[side]) if side.startswith("ours")
           else trl_command(side, run, here, w, args.steps))
    print(f"[context] {side} at {length} tokens: {' '.join(cmd)}", flush=True)
    m = run_measured(cmd, child_env(run, args.threads, probe_dir), run / "log.txt", poll=0.1, cap=args.cap_bytes)
    probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").exists() else {}
    result = {"side": side, "length": length, **m}
    steps = probe.get("steps") or []
    if m["exit_code"] != 0 or len(steps) < args.steps:
        result["ok"] = False
        tail = (run / "log.txt").read_text(errors="replace").splitlines()[-6:]
        result["why"] = (f"passed the {args.cap} cap" if m["over_cap"] else
                         f"exit {m['exit_code']}: " + " | ".join(t.strip() for t in tail)[-300:])
        print(f"[context] {side} at {length}: FAILED ({result['why']})", flush=True)
        return result
    times = [probe["train_begin"]] + [s[1] for s in steps]
    per_step = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    result.update(ok=True, seconds_per_step=min(per_step), tokens_real=probe.get("tokens_real"))
    result["seconds_per_token"] = result["seconds_per_step"] / length
    print(f"[context] {side} at {length}: peak RSS {m['peak_rss_mb']:.0f} MB, {result['seconds_per_step']:.3g} s "
          f"per step", flush=True)
    return result


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def report(summary: dict, out: Path, tag: str) -> None:
    runs, sides, lengths = summary["runs"], summary["sides"], summary["lengths"]
    by = {(r["side"], r["length"]): r for r in runs}
    lines = [f"# Training memory against sample length ({summary['preset']})", "",
             f"Command: `{summary['command']}`", "",
             f"{summary['date']}, {summary['threads']} thread(s) per process, {summary['steps']} optimizer step(s) of "
             f"one sample per run, memory cap {summary['cap']}. Peak RSS of the training process in MB; seconds "
             "per optimizer step (the fastest step); `-`: not run (a shorter length already failed or passed the "
             "cap).", "",
             "| length | " + " | ".join(f"{s} peak MB | {s} s/step" for s in sides) + " | memory, time: "
             f"{sides[0]} / {sides[-1]} |",
             "| --- | " + " | ".join("--- | ---" for _ in sides) + " | --- |"]
    for n in lengths:
        cells = []
        for s in sides:
            r = by.get((s, n))
            if r is None:
                cells += ["-", "-"]
            elif not r["ok"]:
                cells += [("over cap" if r["over_cap"] else "failed"), "-"]
            else:
                cells += [_mb(r["peak_rss_mb"]), f"{r['seconds_per_step']:.3g}"]
        a, b = by.get((sides[0], n)), by.get((sides[-1], n))
        both = a is not None and b is not None and a["ok"] and b["ok"] and len(sides) > 1
        ratio = (f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, {a['seconds_per_step'] / b['seconds_per_step']:.2f}x"
                 if both else "-")
        lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "| side | longest length within the cap (measured) |", "| --- | --- |"]
    for s in sides:
        lines.append(f"| {s} | {summary['longest'].get(s) or 'none'} |")
    lines += ["", *summary["findings"], ""]
    (out / f"{tag}.md").write_text("\n".join(lines), encoding="utf-8")
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in sides:
        pts = [(r["length"], r["peak_rss_mb"] / 1024) for r in runs if r["side"] == s and r["ok"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    ax.axhline(summary["cap_bytes"] / 2**30, color="grey", linestyle="--", label=f"cap {summary['cap']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per sample (one sample per micro-batch)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"Training memory against length ({summary['preset']}, {summary['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{tag}.png", dpi=110)


def _longest_under(runs: list[dict], side: str, cap: int) -> int | None:
    """The longest length of `side` whose run, and every shorter one, completed under `cap` bytes of peak RSS."""
    best = None
    for r in sorted((r for r in runs if r["side"] == side), key=lambda r: r["length"]):
        if not r["ok"] or r["peak_rss_mb"] * 2**20 > cap:
            break
        best = r["length"]
    return best


def findings(runs: list[dict], sides: list[str], longest: dict, cap_bytes: int) -> list[str]:
    """The issue's three comparisons, as measured (whatever they are)."""
    ok = {(r["side"], r["length"]): r for r in runs if r["ok"]}
    out = []
    trl = next((s for s in ("trl-best", "trl-default") if s in sides), None)
    if "ours" in sides and trl:
        common = sorted(n for (s, n) in ok if s == "ours" and (trl, n) in ok)
        if common:
            n = common[-1]
            ratio = ok[("ours", n)]["peak_rss_mb"] / ok[(trl, n)]["peak_rss_mb"]
            out.append(f"- At {n:,} tokens (the longest both completed) our peak memory is {ratio:.2f}x {trl}'s "
                       f"({_mb(ok[('ours', n)]['peak_rss_mb'])} vs {_mb(ok[(trl, n)]['peak_rss_mb'])} MB).")
        if longest.get("ours") and longest.get(trl):
            out.append(f"- Longest length within the cap: ours {longest['ours']:,}, {trl} {longest[trl]:,} "
                       f"({longest['ours'] / longest[trl]:.1f}x; ours may fit more: lengths past the list were "
                       "not tried).")
    caps = [c for c in (2, 4) if c * 2**30 < cap_bytes]
    if caps:
        words = []
        for c in caps:
            fits = {s: _longest_under(runs, s, c * 2**30) for s in sides}
            words.append(f"{c} GB: " + ", ".join(f"{s} {fits[s]:,}" if fits[s] else f"{s} none" for s in sides))
        out.append("- Longest length under smaller caps, from the same measured peaks (lengths past the list not "
                   "tried): " + "; ".join(words) + ".")
    ours = sorted(n for (s, n) in ok if s == "ours")
    if len(ours) >= 2:
        lo = next((n for n in ours if n >= 2048), ours[0])
        hi = ours[-1]
        ratio = ok[("ours", hi)]["seconds_per_token"] / ok[("ours", lo)]["seconds_per_token"]
        out.append(f"- Seconds per token, ours: {hi:,} tokens {ratio:.2f}x those at {lo:,} (attention's work per "
                   "token grows with the length itself, whatever the memory savings cost).")
    if "ours-plain" in sides:
        both = sorted(n for (s, n) in ok if s == "ours-plain" and ("ours", n) in ok)
        if both:
            n = both[-1]
            a, b = ok[("ours", n)], ok[("ours-plain", n)]
            out.append(f"- The memory savings' cost at {n:,} tokens: checkpointing + tiled MLP "
                       f"{a['seconds_per_step'] / b['seconds_per_step']:.2f}x the step time without them, "
                       f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x the memory.")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--sides", default="ours,trl-best", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--cap", default="8GB", help="memory cap per process tree (a side is stopped past it)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (one sample each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work"))
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--tag", default="context")
    ap.add_argument("--report", metavar="JSON", help="only write the report again from a saved CONTEXT.json")
    args = ap.parse_args(argv)
    if args.report:
        summary = json.loads(Path(args.report).read_text())
        summary["findings"] = findings(summary["runs"], summary["sides"], summary["longest"], summary["cap_bytes"])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report(summary, Path(args.out), args.tag)
        print("\n".join(summary["findings"]))
        return summary
    args.cap_bytes = parse_size(args.cap)
    sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        ap.error(f"unknown side(s) {bad}; choose from {SIDES}")
    lengths = sorted(int(n) for n in args.lengths.split(","))
    work = Path(args.work)
    assets = build_assets(work / f"assets-sft-{args.preset}", args.preset, train_samples=4)
    if args.preset in ("full", "tiny"):
        from bench_assets import ROLES, _words
        from tiny_tokenizer import SPECIAL

        assets["words"] = _words(PRESETS[args.preset].vocab - len(SPECIAL) - len(ROLES))  # the tokenizer's words
    probe_dir = write_probe_hook(work)
    runs, failed = [], set()
    for n in lengths:
        for side in sides:
            if side in failed:
                continue
            r = run_one(side, n, args, assets, probe_dir)
            runs.append(r)
            if not r["ok"]:
                failed.add(side)
    longest = {s: max((r["length"] for r in runs if r["side"] == s and r["ok"]), default=None) for s in sides}
    summary = {"command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else ["bench_context.py",
                                                                                               *argv])]),
               "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "threads": args.threads,
               "steps": args.steps, "cap": args.cap, "cap_bytes": args.cap_bytes, "sides": sides,
               "lengths": lengths, "runs": runs, "longest": longest,
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    summary["findings"] = findings(runs, sides, longest, args.cap_bytes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report(summary, out, args.tag)
    print("\n".join(summary["findings"]))
    return summary


if __name__ == "__main__":
    main()
