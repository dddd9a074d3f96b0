"""The GPU check's training comparison: `ft train` against `trl sft` / `trl dpo` with trl's best flags, same work.

It reuses the CPU benchmark (`scripts/bench_train.py`: the recipe and trl config builders, `run_one`, the probe of
`bench_probe.py`, `bench_report.summarize`) with a GPU profile:

* the model: a random Llama of Llama 3.2 1B's shape (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192, 128,256-word
  vocabulary, tied embeddings: 1.24B parameters), saved in bf16; the tokenizer and the chat data come from
  `bench_assets.py` (word-level tokenizer, sample lengths log-normal around 640 tokens, 64 to 2048);
* every side in bf16 (QLoRA: NF4 base, bf16 compute), LoRA r16 on all linear layers, the same samples per step;
* ours: the recipe defaults (every default fast path on); trl-best: bf16, no gradient checkpointing, and, where
  they are installed, `use_liger_kernel` and padding-free batches with flash-attention 2 (trl's padding-free is
  only correct with flash attention: with sdpa the packed samples would attend to each other). The flags used and
  why are in the result.

Peak GPU memory is `torch.cuda.max_memory_allocated` of each training process, written at its exit by the probe
hook below. `--rehearse` runs the same code on the CPU with the benchmark's tiny preset and its CPU flags.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
import bench_assets  # noqa: E402
import bench_train  # noqa: E402

GPU_PRESET = bench_assets.Preset(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
                                 min_len=64, max_len=2048, median_len=640, sigma=0.75, train_samples=128,
                                 eval_samples=16)
REHEARSE_PRESET = bench_assets.PRESETS["tiny"]
SAMPLES = {"sft": 128, "dpo": 64}  # SFT: 16 steps of 8 samples; DPO: 16 steps of 4 pairs
REHEARSE_SAMPLES = {"sft": 8, "dpo": 8}  # 2 steps each
BATCH = {"sft": (4, 2), "dpo": (2, 2)}  # micro batch x accumulation (samples, pairs)
REHEARSE_BATCH = {"sft": (2, 2), "dpo": (2, 2)}
THREADS = {"gpu": 8, "rehearse": 1}
WARMUP_STEPS = {"gpu": 3, "rehearse": 1}  # left out of the rate: Triton compilation and autotuning, on both sides

HOOK = """import os, sys
if os.environ.get('FT_BENCH_PROBE'):
    sys.path.insert(0, {scripts!r})
    from bench_probe import install_probe
    install_probe(os.environ['FT_BENCH_PROBE'])
    import atexit, json

    def _record_cuda():
        # peak GPU memory and the distributed setup of this process, beside the probe's file (one per process)
        torch = sys.modules.get('torch')
        out = {{'pid': os.getpid(), 'cuda': bool(torch is not None and torch.cuda.is_available()
                                                and torch.cuda.is_initialized())}}
        if out['cuda']:
            out.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                       device=torch.cuda.get_device_name())
        state = sys.modules.get('accelerate.state')
        if state is not None:
            shared = state.AcceleratorState._shared_state
            out['distributed_type'] = str(shared.get('distributed_type'))
            out['fsdp_plugin'] = shared.get('fsdp_plugin') is not None
            out['num_processes'] = shared.get('num_processes')
        with open(os.environ['FT_BENCH_PROBE'] + f'.process-{{os.getpid()}}.json', 'w') as f:
            json.dump(out, f)

    atexit.register(_record_cuda)
"""


def write_hook(work: Path) -> Path:
    """A `sitecustomize` with the benchmark probe plus the record of peak GPU memory at exit; returns its folder."""
    d = work / "probe"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(HOOK.format(scripts=str(SCRIPTS)))
    return d


def process_records(run_dir: Path) -> list[dict]:
    """What the hook wrote for each process of a run (the launcher's too)."""
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe.json.process-*.json"))]


def peak_gpu_bytes(run_dir: Path) -> int | None:
    """The largest `torch.cuda.max_memory_allocated` of a run's processes (None: no process used CUDA)."""
    peaks = [r["max_allocated"] for r in process_records(run_dir) if r.get("cuda")]
    return max(peaks) if peaks else None


def build_model(out: Path, p: bench_assets.Preset, device: str, seed: int = 0) -> int:
    """A random Llama of the preset's shape with tied embeddings, saved in bf16 (built on `device`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                      max_position_embeddings=p.max_len, rope_theta=500000.0, pad_token_id=0, bos_token_id=None,
                      eos_token_id=3, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return sum(t.numel() for t in model.parameters())


def build_assets(root: Path, rehearse: bool) -> dict:
    """The model, tokenizer and SFT and DPO data of the check under `root`; returns where they are."""
    p = REHEARSE_PRESET if rehearse else GPU_PRESET
    samples = REHEARSE_SAMPLES if rehearse else SAMPLES
    model_dir = root / "model"
    _, words = bench_assets.build_tokenizer(model_dir, p.vocab)
    if rehearse:  # the CPU benchmark's tiny model (float32, as its CPU flags train it)
        params = bench_assets.build_model(model_dir, p, seed=0)
    else:
        params = build_model(model_dir, p, "cuda")
    out = {"model": str(model_dir), "parameters": params, "preset": p.__dict__, "rehearse": rehearse}
    rng = random.Random(0)
    for mode, make in (("sft", bench_assets.make_rows), ("dpo", bench_assets.make_pairs)):
        train = bench_assets.write_jsonl(root / f"data-{mode}" / "train.jsonl", make(words, p, samples[mode], rng))
        out[mode] = {"model": str(model_dir), "train": str(train), "train_dir": str(train.parent),
                     "eval": str(train), "parameters": params}  # no held-out pass on the GPU: eval is unused
    (root / "assets.json").write_text(json.dumps(out, indent=1))
    return out


def availability() -> dict[str, bool]:
    """Which of trl's optional fast paths can run here."""
    from transformers.utils import is_flash_attn_2_available

    return {"liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
            "flash_attn_2": bool(is_flash_attn_2_available())}


def trl_best_flags(mode: str, have: dict[str, bool]) -> tuple[dict, list[str]]:
    """trl's fastest same-work flags on a GPU with what is installed, and the reasons for what is left out."""
    flags: dict = {"bf16": True, "gradient_checkpointing": False}
    notes = []
    if have["liger_kernel"]:
        flags["use_liger_kernel"] = True
    else:
        notes.append("use_liger_kernel off: liger-kernel is not installed")
    if have["flash_attn_2"]:
        flags["attn_implementation"] = "flash_attention_2"
        if mode == "sft":
            flags.update(padding_free=True, max_length=None)
    else:
        notes.append("no flash attention (flash-attn is not installed): sdpa with padded batches, since trl's "
                     "padding-free batches are only correct with flash attention")
    if mode == "dpo":
        notes.append("trl 1.16 has switched DPO padding_free off")
    return flags, notes


def settings(mode: str, rehearse: bool) -> tuple[object, dict]:
    """The benchmark's arguments and work settings of one mode, with the GPU profile unless rehearsing."""
    micro, accum = (REHEARSE_BATCH if rehearse else BATCH)[mode]
    args = bench_train.parse_args(["--mode", mode, "--preset", "tiny", "--sides", "ours", "--micro-batch", str(micro),
                                   "--grad-accum", str(accum), "--threads", str(THREADS["rehearse" if rehearse
                                                                                          else "gpu"])])
    w = bench_train.work_settings(args)
    w["max_length"] = (REHEARSE_PRESET if rehearse else GPU_PRESET).max_len
    if not rehearse:
        flags, notes = trl_best_flags(mode, availability())
        w.update(dtype="bfloat16", use_cpu=False, trl_flags={"trl-best": flags, "trl-default": {}},
                 trl_notes=notes)
    return args, w


def run_side(work: Path, mode: str, side: str, rehearse: bool, max_steps: int | None = None,
             extra: list[str] | None = None, label: str | None = None, drop_flags: tuple[str, ...] = ()) -> dict:
    """One training run of the benchmark (`ours` or a trl side) in its own process; its figures.

    `drop_flags` leaves those trl-best flags out (the retry of a run that a flag broke).

    Raises:
        SystemExit: the run failed (the message holds the end of its log).
    """
    assets = json.loads((work / "assets" / "assets.json").read_text())
    args, w = settings(mode, rehearse)
    if drop_flags and "trl_flags" in w:
        best = {k: v for k, v in w["trl_flags"]["trl-best"].items() if k not in drop_flags}
        w["trl_flags"] = {**w["trl_flags"], "trl-best": best}
        w["trl_notes"] = [*w["trl_notes"], f"left out after the first try failed: {', '.join(drop_flags)}"]
    args.work = str(work / "bench")
    args.cap = {side: max_steps} if max_steps else {}
    args.ours_set = list(extra or [])
    result = bench_train.run_one(side, 0, args, assets[mode], w, write_hook(work), label=label)
    run_dir = Path(result["run_dir"])
    result["processes"] = process_records(run_dir)
    result["peak_gpu_bytes"] = peak_gpu_bytes(run_dir)
    result.update(warm_rate(result["probe"]["steps"], WARMUP_STEPS["rehearse" if rehearse else "gpu"]))
    result["attention_calls"] = attention_calls(run_dir) if side == "ours" else None
    result["work"] = w
    return result


def warm_rate(steps: list[list[float]], warmup: int) -> dict:
    """Real tokens/s after the first `warmup` optimizer steps and the spread of the per-step rates after them.

    `steps` are the probe's `[step, time at its end (device synchronised), real tokens so far]`. With too few steps
    to leave `warmup` out, the first step alone is left out (and `warmup_steps` says so).
    """
    warmup = min(warmup, len(steps) - 2) if len(steps) > 2 else min(1, len(steps) - 1)
    if warmup < 1 or len(steps[0]) < 3:
        return {"tokens_per_second_after_warmup": None, "warmup_steps": 0, "measured_steps": 0,
                "rate_spread": None}
    tail = steps[warmup - 1:]
    rates = [(b[2] - a[2]) / (b[1] - a[1]) for a, b in zip(tail, tail[1:], strict=False) if b[1] > a[1]]
    mean = sum(rates) / len(rates) if rates else 0.0
    spread = (sum((r - mean) ** 2 for r in rates) / len(rates)) ** 0.5 / mean if len(rates) > 1 and mean else None
    return {"tokens_per_second_after_warmup": (tail[-1][2] - tail[0][2]) / (tail[-1][1] - tail[0][1]),
            "warmup_steps": warmup, "measured_steps": len(tail) - 1, "rate_spread": spread}


def attention_calls(run_dir: Path) -> dict[str, dict[str, int]]:
    """Which attention path ran how often in each stage of one of our runs (the stage summaries' counts)."""
    out = {}
    for path in sorted(run_dir.glob("out/*summary.json")) + sorted(run_dir.glob("out/*/summary.json")):
        for name, stage in json.loads(path.read_text()).get("stages", {}).items():
            out[name] = stage.get("attention_calls", {})
    return out


def baseline_label(flags: dict) -> str:
    """What the trl side really ran, in words: its attention and batches, liger or not."""
    flash = flags.get("attn_implementation") == "flash_attention_2"
    words = ["trl with flash-attention 2" if flash else "trl with sdpa",
             "padding-free" if flags.get("padding_free") else "padded"]
    if flags.get("use_liger_kernel"):
        words.append("liger kernels")
    return ", ".join(words)


def dpo_reference_flops(flops: dict) -> float:
    """FLOPs per token of DPO's reference forward (adapter off): half the base and head terms, a third of attention.

    bench_probe's training formula counts forward + backward (2x the forward for a frozen base); the reference
    model runs the forward alone."""
    return (flops["base_linear"] + flops["lm_head"]) / 2 + flops["attention"] / 3


def compare(work: Path, mode: str, rehearse: bool, peaks: dict) -> dict:
    """Side by side figures of one mode from the saved side results; ratios ours / trl-best and the targets."""
    import bench_report

    results = {}
    for side in ("ours", "trl-best"):
        path = work / "results" / f"{mode}-{side}.json"
        if path.exists() and json.loads(path.read_text()).get("status") == "passed":
            results[side] = json.loads(path.read_text())["figures"]["run"]
    if not results:
        raise SystemExit(f"no finished {mode} run to compare")
    assets = json.loads((work / "assets" / "assets.json").read_text())[mode]
    _, w = settings(mode, rehearse)
    meta = {"mode": mode, "preset": "gpu" if not rehearse else "tiny", "heldout_noise": []}
    summary = bench_report.summarize(list(results.values()), [peaks], assets, w, meta)
    flops = summary["flops_per_token"]
    per_token = flops["total"] + (dpo_reference_flops(flops) if mode == "dpo" else 0.0)
    peak_key = "float32" if rehearse else "bfloat16"
    sides = {}
    for side, run in results.items():
        rate = run["tokens_per_second"]
        sides[side] = {"tokens_per_second": rate, "pairs_per_second": run["pairs_per_second"],
                       "tokens_per_second_after_warmup": run.get("tokens_per_second_after_warmup"),
                       "warmup_steps": run.get("warmup_steps"), "measured_steps": run.get("measured_steps"),
                       "rate_spread": run.get("rate_spread"), "attention_calls": run.get("attention_calls"),
                       "peak_gpu_bytes": run.get("peak_gpu_bytes"), "peak_rss_mb": run["peak_rss_mb"],
                       "wall_seconds": run["wall_seconds"], "time_to_first_step": run["time_to_first_step"],
                       "train_seconds": run["train_seconds"], "steps": len(run["probe"]["steps"]),
                       "tokens_real": run["probe"]["tokens_real"], "tokens_labels": run["probe"]["tokens_labels"],
                       "final_train_loss": run["final_train_loss"],
                       "mfu": per_token * rate / peaks[peak_key]["flops"]}
    used = results.get("trl-best", {}).get("work", w)  # the flags the trl run had (a retry may have dropped one)
    best = used.get("trl_flags", bench_train.TRL_FLAGS[mode])["trl-best"]
    out = {"baseline": baseline_label(best), "mode": mode, "sides": sides, "dataset": summary["dataset"],
           "flops_per_token": per_token,
           "flops_terms": flops, "mfu_against": f"{peak_key} matmul peak {peaks[peak_key]['flops'] / 1e12:.3g} TFLOP/s",
           "trl_best_flags": best,
           "trl_notes": used.get("trl_notes", ["rehearsal: the CPU benchmark's trl-best flags"])}
    if {"ours", "trl-best"} <= sides.keys():
        ours, trl = sides["ours"], sides["trl-best"]
        # after warm-up on both sides where both have it (Triton compiles in the first steps of either side)
        warm = bool(ours["tokens_per_second_after_warmup"] and trl["tokens_per_second_after_warmup"])
        key = "tokens_per_second_after_warmup" if warm else "tokens_per_second"
        ratios = {"tokens_per_second": ours[key] / trl[key], "rate": "after warm-up" if warm else "whole run",
                  "tokens_per_second_whole_run": ours["tokens_per_second"] / trl["tokens_per_second"],
                  "same_label_tokens": ours["tokens_labels"] == trl["tokens_labels"]}
        if ours["peak_gpu_bytes"] and trl["peak_gpu_bytes"]:
            ratios["peak_gpu_memory"] = ours["peak_gpu_bytes"] / trl["peak_gpu_bytes"]
        out["ours_over_trl_best"] = ratios
        out["targets"] = {f"tokens/s >= 1.3x {out['baseline']}": ratios["tokens_per_second"] >= 1.3}
        if "peak_gpu_memory" in ratios:
            out["targets"][f"peak GPU memory <= 0.7x {out['baseline']}"] = ratios["peak_gpu_memory"] <= 0.7
    return out
