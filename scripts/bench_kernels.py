"""Benchmark the fused kernels against the unfused PyTorch/peft/bitsandbytes formulation, op by op.

    .venv/bin/python scripts/bench_kernels.py            # full sweep (CPU: a few minutes on 2 cores)
    .venv/bin/python scripts/bench_kernels.py --quick    # smoke run, small sizes

Every case is one training step of the op (forward + backward, gradients for the inputs and the LoRA
matrices; frozen base weights and LM head, as under QLoRA), run ``--reps`` times after a warm-up; the CSV has the
median, 20th and 80th percentile wall time and the peak memory of one step, plus the device name and the package
versions on every row. On CUDA the fused side is the Triton path; on CPU it is the PyTorch implementation of the
same algorithm (what runs there).

Peak memory, honestly measured:
* CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocation before it.
* CPU: each case runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB (every tensor-sized block
  is mapped on allocation and unmapped on free, so RSS follows live tensors). After warm-up steps the kernel's
  peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and the step's peak is ``VmHWM - VmRSS`` from
  ``/proc/self/status``: every byte the step made resident, tensors or not. Without ``clear_refs`` it falls back
  to ``ru_maxrss`` growth, a lower bound.

Saved for backward: bytes of the storages autograd keeps from the forward (``saved_tensors_hooks``), inputs and
weights excluded: the activation memory that piles up layer after layer in a real network.

Outputs in --out (default runs/bench_kernels/): kernels.csv and kernels.png.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

SIZES = {  # op -> (swept parameter, full sweep, quick sweep)
    "fused_ce": ("vocab", [8192, 32768, 65536], [8192, 32768]),
    "lora_linear": ("tokens", [256, 1024, 4096], [256, 1024]),
    "lora_mlp": ("tokens", [256, 1024, 4096], [256, 1024]),
    "lora_qkv": ("tokens", [256, 1024, 4096], [256]),
    "rmsnorm": ("rows", [1024, 4096, 16384], [1024, 4096]),
    "rope": ("seq", [512, 2048, 8192], [512, 2048]),
}
Step = Callable[[], None]


def _nf4(out_f: int, in_f: int, dtype: torch.dtype, device: str):
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4 import NF4Weight

    packed, qs = bnbf.quantize_4bit(
        torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.05,
        blocksize=64,
        quant_type="nf4",
        compress_statistics=True,
    )
    return packed, qs, NF4Weight.from_quant_state(packed, qs)


def _lora_ab(out_f: int, in_f: int, r: int, dtype: torch.dtype, device: str):
    a = (torch.randn(r, in_f, device=device) * 0.02).to(dtype).requires_grad_()
    b = (torch.randn(out_f, r, device=device) * 0.02).to(dtype).requires_grad_()
    return a, b


def _peft_bnb(x: torch.Tensor, packed, qs, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What peft's Linear4bit LoRA layer computes (bitsandbytes matmul + LoRA branch under autograd)."""
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, packed, quant_state=qs) + (x @ a.t()) @ b.t() * scale


def build(op: str, size: int, quick: bool, dtype: torch.dtype, device: str) -> dict[str, Step]:
    """Returns ``{"fused": step, "unfused": step}`` for one case."""
    from finetune.kernels import cross_entropy as ce
    from finetune.kernels.lora_linear import LoRAParams, lora_linear
    from finetune.kernels.lora_mlp import lora_mlp
    from finetune.kernels.lora_qkvo import lora_qkv
    from finetune.kernels.rmsnorm import rms_norm, rms_norm_reference
    from finetune.kernels.rope import apply_rope, apply_rope_reference

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    def step(fn: Callable[[], torch.Tensor | tuple], leaves: list[torch.Tensor]) -> Step:
        def run() -> None:
            for t in leaves:
                t.grad = None
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o.float().sum() if o.dim() else o for o in outs])

        run.leaves = leaves  # type: ignore[attr-defined]
        return run

    if op == "fused_ce":
        tokens, hidden = (512, 256) if quick else (1024, 256)
        h, w = rand(tokens, hidden), rand(size, hidden, grad=False)
        labels = torch.randint(0, size, (tokens,), device=device)
        return {
            "fused": step(lambda: ce.chunked_cross_entropy(h, w, labels), [h]),
            "unfused": step(lambda: ce.cross_entropy_reference(h, w, labels), [h]),
        }
    if op in ("lora_linear", "lora_qkv", "lora_mlp"):
        hidden = 512 if quick else 1024
        x, r, s = rand(size, hidden), 16, 2.0
        if op == "lora_linear":
            packed, qs, w = _nf4(hidden, hidden, dtype, device)
            a, b = _lora_ab(hidden, hidden, r, dtype, device)
            return {
                "fused": step(lambda: lora_linear(x, w, a, b, s), [x, a, b]),
                "unfused": step(lambda: _peft_bnb(x, packed, qs, a, b, s), [x, a, b]),
            }
        shapes = (
            [(hidden, hidden), (hidden // 4, hidden), (hidden // 4, hidden)]
            if op == "lora_qkv"
            else [(hidden * 11 // 4, hidden), (hidden * 11 // 4, hidden), (hidden, hidden * 11 // 4)]
        )
        projs = [(*_nf4(o, i, dtype, device), *_lora_ab(o, i, r, dtype, device)) for o, i in shapes]
        params = [LoRAParams(p[2], p[3], p[4], s) for p in projs]
        leaves = [x] + [t for p in projs for t in p[3:]]
        if op == "lora_qkv":
            return {
                "fused": step(lambda: lora_qkv(x, *params), leaves),
                "unfused": step(lambda: tuple(_peft_bnb(x, p[0], p[1], p[3], p[4], s) for p in projs), leaves),
            }

        def mlp_unfused() -> torch.Tensor:
            g, u = (_peft_bnb(x, p[0], p[1], p[3], p[4], s) for p in projs[:2])
            d = projs[2]
            return _peft_bnb(torch.nn.functional.silu(g) * u, d[0], d[1], d[3], d[4], s)

        return {"fused": step(lambda: lora_mlp(x, *params), leaves), "unfused": step(mlp_unfused, leaves)}
    if op == "rmsnorm":
        hidden = 2048 if quick else 4096
        x, w = rand(size, hidden), torch.ones(hidden, device=device, dtype=dtype)
        return {
            "fused": step(lambda: rms_norm(x, w, 1e-6), [x]),
            "unfused": step(lambda: rms_norm_reference(x, w, 1e-6), [x]),
        }
    if op == "rope":
        hq, hk, dim = (8, 2, 128) if quick else (32, 8, 128)
        q, k = rand(1, size, hq, dim).transpose(1, 2), rand(1, size, hk, dim).transpose(1, 2)
        angle = torch.rand(1, size, dim // 2, device=device) * 6
        cos, sin = (torch.cat([f(angle)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        return {
            "fused": step(lambda: apply_rope(q, k, cos, sin), [q, k]),
            "unfused": step(lambda: apply_rope_reference(q, k, cos, sin), [q, k]),
        }
    raise ValueError(op)


def saved_for_backward(fn: Step) -> int:
    """Bytes of activations the forward keeps for backward (storages created by the step, not inputs/weights).

    This is what accumulates over a network's layers until the backward pass; the step peak is the transient
    high-water of one op in isolation.
    """
    existing = {o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn: Step, reps: int, warmup: int, device: str) -> tuple[list[float], int, str]:
    """Warm-up steps, one step for peak memory, then ``reps`` timed steps. Returns (ms list, peak bytes, method).

    The memory step comes after the warm-up (one-time library initialisation is not the op's memory) and after
    the previous step's gradients are dropped (they would otherwise be freed inside the measured step).
    """
    for _ in range(max(1, warmup)):
        fn()
    for t in getattr(fn, "leaves", []):
        t.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_kb("VmRSS")
            fn()
            peak, method = (_status_kb("VmHWM") - base) * 1024, "RSS high-water (clear_refs), fresh process"
        except OSError:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn()
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
            method = "ru_maxrss growth (lower bound), fresh process"
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times, max(peak, 0), method


def _environment(device: str) -> dict[str, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        name = f"{cpu[0].split(':', 1)[1].strip() if cpu else platform.processor()} x{os.cpu_count()}"
    env = {"device": device, "device_name": name, "python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "absent"
    return env


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_case(args: argparse.Namespace, op: str, size: int, impl: str) -> dict:
    """Runs a case here (CUDA) or in a fresh subprocess (CPU, for a clean peak-RSS reading)."""
    if args.device == "cuda":
        return worker(op, size, impl, args.quick, args.dtype, "cuda", args.reps, args.warmup)
    spec = json.dumps(
        {
            "op": op,
            "size": size,
            "impl": impl,
            "quick": args.quick,
            "dtype": args.dtype,
            "reps": args.reps,
            "warmup": args.warmup,
        }
    )
    # A fixed mmap threshold makes glibc serve every block >= 64 KiB with mmap and unmap it on free, so RSS follows
    # the live tensors instead of a heap that keeps freed memory (the dynamic threshold would hide reuse).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode:
        raise RuntimeError(f"{op}/{impl}/{size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(op: str, size: int, impl: str, quick: bool, dtype: str, device: str, reps: int, warmup: int) -> dict:
    """One case: build, measure, summarise."""
    torch.manual_seed(0)
    fn = build(op, size, quick, getattr(torch, dtype), device)[impl]
    times, peak, method = measure(fn, reps, warmup, device)
    saved = saved_for_backward(fn)
    return {
        "saved_for_backward_mb": saved / 2**20,
        "median_ms": statistics.median(times),
        "p20_ms": _percentile(times, 0.2),
        "p80_ms": _percentile(times, 0.8),
        "peak_mem_mb": peak / 2**20,
        "mem_method": method,
    }


def _number(value: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def plot(rows: list[dict], path: Path) -> None:
    """Time and peak memory against the swept size, fused vs unfused, one row of panels per op."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(10, 2.8 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for impl, style, color in (("fused", "o-", "tab:blue"), ("unfused", "s--", "tab:orange")):
            sel = [r for r in rows if r["op"] == op and r["impl"] == impl]
            xs = [r["size"] for r in sel]
            axes[i][0].plot(xs, [r["median_ms"] for r in sel], style, color=color, label=impl)
            axes[i][0].fill_between(xs, [r["p20_ms"] for r in sel], [r["p80_ms"] for r in sel], color=color, alpha=0.2)
            axes[i][1].plot(xs, [r["peak_mem_mb"] for r in sel], style, color=color, label=f"{impl} step peak")
            axes[i][1].plot(
                xs, [r["saved_for_backward_mb"] for r in sel], style[0] + ":", color=color, label=f"{impl} saved"
            )
        for j, ylabel in enumerate(("step time (ms, median, p20-p80)", "MiB: step peak / saved for bwd")):
            axes[i][j].set(xscale="log", xlabel=SIZES[op][0], ylabel=ylabel, title=op)
            axes[i][j].legend(fontsize=8)
            axes[i][j].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    env = rows[0]
    fig.suptitle(f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions (smoke run)")
    parser.add_argument("--ops", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels"))
    parser.add_argument("--replot", action="store_true", help="redraw kernels.png from the kernels.csv in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replot:
        with open(args.out / "kernels.csv") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        plot(rows, args.out / "kernels.png")
        return
    if args.worker:
        spec = json.loads(args.worker)
        print(
            json.dumps(
                worker(
                    spec["op"],
                    spec["size"],
                    spec["impl"],
                    spec["quick"],
                    spec["dtype"],
                    "cpu",
                    spec["reps"],
                    spec["warmup"],
                )
            )
        )
        return
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.reps = args.reps or (3 if args.quick else (20 if args.device == "cuda" else 5))
    env = {**_environment(args.device), "dtype": args.dtype}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for op in args.ops.split(","):
        param, full, quick = SIZES[op]
        for size in quick if args.quick else full:
            for impl in ("fused", "unfused"):
                result = run_case(args, op, size, impl)
                rows.append({"op": op, "impl": impl, "param": param, "size": size, **result, **env, "reps": args.reps})
                print(
                    f"{op:12s} {param}={size:<6d} {impl:8s} median {result['median_ms']:9.2f} ms  "
                    f"peak {result['peak_mem_mb']:9.1f} MiB  saved {result['saved_for_backward_mb']:8.1f} MiB",
                    flush=True,
                )
    with open(args.out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "kernels.png")
    for op in dict.fromkeys(r["op"] for r in rows):
        pairs = {(r["size"], r["impl"]): r for r in rows if r["op"] == op}
        for size in sorted({s for s, _ in pairs}):
            fused, unfused = pairs[(size, "fused")], pairs[(size, "unfused")]
            saving = 1 - fused["peak_mem_mb"] / unfused["peak_mem_mb"] if unfused["peak_mem_mb"] else 0.0
            print(
                f"{op} {SIZES[op][0]}={size}: step peak {fused['peak_mem_mb']:.1f} vs {unfused['peak_mem_mb']:.1f} "
                f"MiB ({saving:+.0%} saved); saved for backward {fused['saved_for_backward_mb']:.1f} vs "
                f"{unfused['saved_for_backward_mb']:.1f} MiB; time x{fused['median_ms'] / unfused['median_ms']:.2f}"
            )
    print(f"wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.png'}")


if __name__ == "__main__":
    main()
