"""Benchmark the data path at growing sizes: our preprocessing against trl sft's own, side by side, and the time to
the first optimizer step (cold cache, warm cache, streaming).

    .venv/bin/python scripts/bench_data.py --rows 10000,100000 --text-mb 50          # what bench/data.md reports
    .venv/bin/python scripts/bench_data.py --rows 200 --text-mb 0.2 --out /tmp/b     # smoke run

Data (a pure function of the seed): chat rows of one user and one assistant turn whose length in words is
log-normal (median 160, sigma 0.8, clipped to 32-1024: the training benchmark's `full` preset), words from a Zipf
law over the benchmark's 32k-word tokenizer (one token per word, ChatML with generation markers, so trl's
`assistant_only_loss` labels the tokens `train_on: assistant` labels); a plain-text corpus of log-normal documents
for continued pretraining (`format: text`, packed). Every measurement runs in its own process with the same
`--threads` (data.num_proc / dataset_num_proc, OMP threads) and a fresh datasets cache unless it is the warm one:

* `ours`: `finetune.data.build.prepare` (read, tokenize, mask, select, pack: everything before training);
* `trl`: `load_dataset("json")` + `SFTTrainer(...)` construction (its tokenization, masks and truncation; packing for
  text), minus the same construction on a 16-row file (model wrapping, not data);
* first step: seconds from starting `python -m finetune train` (max_steps 1, the bench tokenizer on a 2-layer
  model) to the end of optimizer step 1, with a cold cache, again with the cache warm, and with `streaming: true`.
  Warm is a later start on the same data: its checks before training find the file recorded as checked (by content
  hash) and do not parse it again.
Peak RSS: the measuring process's own maximum resident set (VmHWM: memory-mapped file pages included), its peak
anonymous memory (sampled RssAnon: heap and Arrow buffers), and the largest of its worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
MEDIAN, SIGMA, MIN_LEN, MAX_LEN, VOCAB = 160, 0.8, 32, 1024, 32768


def _lengths(rng, n: int, median: float = MEDIAN):
    import numpy as np

    return np.clip(np.round(np.exp(rng.normal(math.log(median), SIGMA, n))), MIN_LEN, MAX_LEN).astype(int)


def _texts(rng, words, lengths):
    import numpy as np

    ranks = np.arange(len(words))
    cum = np.cumsum(1.0 / (ranks + 2.7) ** 1.1)
    ids = np.searchsorted(cum, rng.random(int(lengths.sum())) * cum[-1])
    vocab = np.array(words, dtype=object)[ids]
    ends = np.cumsum(lengths)
    return [" ".join(vocab[e - k:e]) for e, k in zip(ends, lengths, strict=True)]


def write_chat(path: Path, words, n: int, seed: int) -> Path:
    """`n` chat rows with log-normal word counts (6 template tokens included, as bench_assets.make_rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = _lengths(rng, n) - 6
    user = np.clip(np.round(total * rng.uniform(0.3, 0.7, n)), 1, total - 1).astype(int)
    asks, answers = _texts(rng, words, user), _texts(rng, words, total - user)
    with path.open("w", encoding="utf-8") as f:
        for q, a in zip(asks, answers, strict=True):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return path


def write_text(path: Path, words, megabytes: float, seed: int) -> Path:
    """Plain-text documents (log-normal, median 400 words) until the file holds `megabytes`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < megabytes * 1e6:
            for doc in _texts(rng, words, _lengths(rng, 1000, 400)):
                f.write(json.dumps({"text": doc}) + "\n")
    return path


class AnonPeak:
    """Samples this process's anonymous resident memory (RssAnon: heap and Arrow buffers, not the pages of
    memory-mapped files, which count in ru_maxrss but the kernel can drop) every 20 ms; `peak_mb` is the largest."""

    def __init__(self):
        import threading

        self.peak_mb = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            time.sleep(0.02)


def _peak_mb(anon: AnonPeak) -> dict:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(own, 1), "anon_rss_mb": round(anon.peak_mb, 1), "worker_rss_mb": round(workers, 1)}


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process (`--worker ours|trl`); returns seconds, tokens and peak RSS."""
    from transformers import AutoTokenizer

    anon = AnonPeak()
    text = args.kind == "text"
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.worker == "ours":
        from finetune.data import apply_template
        from finetune.data.build import prepare
        from finetune.recipe.schema import DataConfig

        data = DataConfig(train=[{"path": args.file, **({"format": "text"} if text else {})}], max_length=MAX_LEN,
                          train_on="assistant", packing=text, num_proc=args.threads, cache_dir=args.cache)
        apply_template(tok, data)
        start = time.perf_counter()
        prepared = prepare(data, tok, "sft", 42, "train")
        seconds, tokens = time.perf_counter() - start, prepared.report.tokens
    else:
        import pyarrow.compute as pc
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        config = SFTConfig(output_dir=str(Path(args.cache) / "trl-out"), dataset_num_proc=args.threads,
                           max_length=MAX_LEN, assistant_only_loss=not text, packing=text, use_cpu=True, bf16=False,
                           report_to=[], dataset_text_field="text")

        def build(file: str):
            ds = load_dataset("json", data_files=file, split="train", cache_dir=str(Path(args.cache) / "hf"))
            return SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)

        small = Path(args.cache) / "small.jsonl"
        with open(args.file, encoding="utf-8") as f, small.open("w", encoding="utf-8") as out:
            out.writelines(line for _, line in zip(range(16), f, strict=False))
        start = time.perf_counter()
        build(str(small))
        fixed = time.perf_counter() - start
        start = time.perf_counter()
        trainer = build(args.file)
        seconds = time.perf_counter() - start - fixed
        tokens = int(pc.sum(pc.list_value_length(trainer.train_dataset.data.column("input_ids"))).as_py())
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds), **_peak_mb(anon)}


STEP_HOOK = """
import json, sys, time
from transformers import TrainerCallback
import finetune.stages.common as common
quiet = common.quiet_trainer
class First(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            open(sys.argv[2], "w").write(json.dumps(time.time()))
common.quiet_trainer = lambda t: (quiet(t), t.add_callback(First()))
from finetune.cli import app
app(["train", sys.argv[1]])
"""


def first_step(run: Path, assets: dict, file: str, cache: Path, threads: int, streaming: bool, env: dict) -> float:
    """Seconds from launching `ft train` (max_steps 1) to the end of optimizer step 1."""
    recipe = {"name": "bench-data", "model": {"name_or_path": assets["model"], "dtype": "float32"},
              "lora": {"r": 8, "alpha": 16},
              "data": {"train": [{"path": file}], "max_length": MAX_LEN, "train_on": "assistant",
                       "num_proc": threads, "cache_dir": str(cache), "streaming": streaming},
              "training": {"max_steps": 1, "micro_batch_size": 4, "logging_steps": 1},
              "output": {"dir": str(run / "out"), "overwrite": True}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(json.dumps(recipe))
    marker = run / "first-step.json"
    marker.unlink(missing_ok=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-c", STEP_HOOK, str(run / "recipe.yaml"), str(marker)], env=env,
                          capture_output=True, text=True, cwd=run)
    if not marker.exists():
        raise RuntimeError(f"ft train did not reach step 1:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return round(json.loads(marker.read_text()) - start, 2)


def measure(args: argparse.Namespace, name: str, file: Path, kind: str, assets: dict, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HF_DATASETS_CACHE": str(work / "hf")}
    out: dict = {"name": name, "kind": kind, "rows": sum(1 for _ in file.open()), "bytes": file.stat().st_size}
    large = kind == "chat" and out["rows"] > args.trl_upto
    sides = ("ours",) if large else ("ours", "trl")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.reps):  # alternating, the first side changing each repetition: load drifts hit both
        for side in sides if rep % 2 == 0 else sides[::-1]:
            cache = work / f"{name}-{side}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / "hf", ignore_errors=True)
            cache.mkdir(parents=True)
            cmd = [sys.executable, __file__, "--worker", side, "--kind", kind, "--file", str(file), "--model",
                   assets["model"], "--cache", str(cache), "--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{side} on {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name} {side}: {runs[side][-1]}", flush=True)
    for side, got in runs.items():  # the median run by time, with every run's seconds
        out[side] = {**sorted(got, key=lambda r: r["seconds"])[len(got) // 2], "runs_s": [r["seconds"] for r in got]}
    if not large:
        out["speedup"] = round(out["ours"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 2)
    if kind == "chat" and not args.no_first_step:
        run = work / f"{name}-run"
        if large:  # the cache `ours` just filled (same data section and seed): warm without a second cold pass
            cache = work / f"{name}-ours"
            # `ours` ran no checks before training; the first start does them and records the file as checked
            out["first_step_unchecked_s"] = first_step(run, assets, str(file), cache, args.threads, False, env)
        else:
            cache = work / f"{name}-first"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / "hf", ignore_errors=True)
            out["first_step_cold_s"] = first_step(run, assets, str(file), cache, args.threads, False, env)
        out["first_step_warm_s"] = first_step(run, assets, str(file), cache, args.threads, False, env)
        out["first_step_stream_s"] = first_step(run, assets, str(file), cache, args.threads, True, env)
        print(f"{name} first step: cold {out.get('first_step_cold_s')} s, warm {out['first_step_warm_s']} s, "
              f"streaming {out['first_step_stream_s']} s", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="10000,100000,1000000", help="chat dataset sizes, comma-separated")
    ap.add_argument("--text-mb", type=float, default=1000.0, help="plain-text corpus size in MB (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="processes/threads for every side")
    ap.add_argument("--reps", type=int, default=1, help="preprocessing runs per side (alternating; median reported)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-data"), help="data files and caches")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="where data.json / data.md / data.png go")
    ap.add_argument("--no-first-step", action="store_true", help="skip the time-to-first-step runs")
    ap.add_argument("--trl-upto", type=int, default=10**9,
                    help="larger chat sizes: ours only (no trl side, no cold first step; warm reuses ours' cache)")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    for hidden in ("--kind", "--file", "--model", "--cache"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    from bench_assets import PRESETS, build_model, build_tokenizer
    from bench_data_report import write_report

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    _, words = build_tokenizer(model, VOCAB)
    build_model(model, PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "vocab": VOCAB}), 0)
    assets = {"model": str(model)}
    results = []
    for n in [int(x) for x in args.rows.split(",") if x]:
        file = work / f"chat-{n}.jsonl"
        if not file.exists():
            write_chat(file, words, n, seed=n)
        results.append(measure(args, f"chat-{n}", file, "chat", assets, work))
    if args.text_mb:
        file = work / f"text-{args.text_mb:g}MB.jsonl"
        if not file.exists():
            write_text(file, words, args.text_mb, seed=7)
        results.append(measure(args, f"text-{args.text_mb:g}MB", file, "text", assets, work))
    summary = {"threads": args.threads, "command": "python scripts/bench_data.py " + " ".join(argv or sys.argv[1:]),
               "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(summary, indent=1))
    write_report(summary, out)
    return summary


if __name__ == "__main__":
    main()
