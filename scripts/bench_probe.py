"""Performance accounting: model FLOPs per token of LoRA training, the machine's measured matmul peak, MFU.

FLOPs per real (non-padding) token of one training step, frozen (possibly 4-bit) base + LoRA, multiply-add = 2 FLOPs:

    forward      2 * N_lin                          every base linear layer (q, k, v, o, gate, up, down)
               + 2 * V * H * f_lab                  LM head, on the positions whose next token carries a label
               + 4 * L * A * ctx                    attention scores and weighted sum (Q K^T, P V)
    backward     2 * N_lin + 2 * V * H * f_lab      gradients w.r.t. activations only: the base is frozen
               + 8 * L * A * ctx                    attention backward (twice its forward)
    LoRA         6 * r * sum(d_in + d_out)          forward, activation and weight gradients of A and B

N_lin: parameters of the base linear layers (no embedding, no head); V, H: vocabulary and hidden size; L: layers;
A: heads x head_dim; f_lab: share of tokens whose next token is trained on (the LM head is not needed elsewhere,
so an implementation that computes it there does work that is not counted); ctx: the token-weighted mean causal
context, sum_i L_i (L_i + 1) / 2 / sum_i L_i over the samples. Recomputation (gradient checkpointing) is not
counted, as usual for MFU.

MFU = FLOPs per token x real tokens per second / measured matmul peak (same thread count, same run).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FlopsPerToken:
    """The terms of the formula in the module docstring, per real token, in FLOPs."""

    base_linear: float
    lm_head: float
    attention: float
    lora: float

    @property
    def total(self) -> float:
        return self.base_linear + self.lm_head + self.attention + self.lora

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer of one Llama-style decoder layer, from a transformers config. Of a
    Mixture-of-Experts layer: what one token runs, the router and its routed experts (as one MLP of top-k x the
    expert size)."""
    h, inter = config.hidden_size, config.intermediate_size
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        inter = config.num_experts_per_tok * (getattr(config, "moe_intermediate_size", None) or inter)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
        **({"router": (h, experts)} if experts else {}),
    }


def causal_context(lengths: Sequence[int]) -> float:
    """Token-weighted mean number of keys a query attends to, causal attention within each sample."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / max(total, 1)


def train_flops_per_token(
    config: Any,
    lora_rank: int,
    lora_targets: Sequence[str] | str = "all-linear",
    context: float = 1.0,
    label_fraction: float = 1.0,
) -> FlopsPerToken:
    """FLOPs per real token of a LoRA training step on a frozen base (formula in the module docstring).

    Args:
        config: A Llama-style transformers config (hidden_size, intermediate_size, heads, layers, vocab_size).
        lora_rank: LoRA rank r.
        lora_targets: `all-linear` or the names of the adapted linear layers.
        context: Token-weighted mean causal context (`causal_context` of the sample lengths).
        label_fraction: Share of real tokens whose next token carries a label.
    """
    shapes = linear_shapes(config)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    targets = list(shapes) if lora_targets == "all-linear" else [t for t in lora_targets if t in shapes]
    n_lin = layers * sum(i * o for i, o in shapes.values())
    head = config.vocab_size * config.hidden_size * label_fraction
    return FlopsPerToken(
        base_linear=4.0 * n_lin,
        lm_head=4.0 * head,
        attention=12.0 * layers * heads * head_dim * context,
        lora=6.0 * lora_rank * layers * sum(sum(shapes[t]) for t in targets),
    )


def measure_matmul_peak(
    dtype: str = "float32",
    sizes: Sequence[int] = (512, 1024, 2048),
    repeats: int = 3,
    budget_seconds: float = 20.0,
) -> dict[str, Any]:
    """Best observed FLOP/s of square `torch.mm` in this process (its thread count), over sizes and repeats.

    A size is skipped once the time spent passes `budget_seconds` (bfloat16 without hardware support is very slow).
    Returns:
        {"dtype", "flops": best FLOP/s, "by_size": {size: best FLOP/s}, "threads"}.
    """
    import torch

    dt = getattr(torch, dtype)
    started = time.perf_counter()
    by_size: dict[int, float] = {}
    for n in sizes:
        if time.perf_counter() - started > budget_seconds:
            break
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        t = time.perf_counter()
        torch.mm(a, b)  # warm-up (and a first timing, in case the budget stops us here)
        best = time.perf_counter() - t
        for _ in range(repeats):
            if time.perf_counter() - started > budget_seconds:
                break
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        by_size[n] = 2.0 * n**3 / best
    return {"dtype": dtype, "flops": max(by_size.values()), "by_size": by_size, "threads": torch.get_num_threads()}


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s."""
    return flops_per_token * tokens_per_second / peak_flops if peak_flops > 0 else float("nan")


# --- Measuring a training process from outside -------------------------------------------------------------------
# The benchmark starts each tool (`ft train`, `trl sft`, ...) as its own process with FT_BENCH_PROBE=<file.json> and a
# `sitecustomize` that calls `install_probe`. The probe waits for `transformers.trainer` to be imported (so it adds
# no import to a process that never trains, like the `trl` launcher), then records, identically for every tool: when
# training began, when each optimizer step ended, the logged losses, and the tokens in every micro-batch.


class _Timeline:
    """What the probe records; written as JSON after every optimizer step (a crash still leaves data)."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict[str, Any] = {"probe_installed": time.time(), "train_begin": None, "train_end": None,
                                     "steps": [], "losses": [], "micro_batches": 0, "rows": 0, "tokens_real": 0,
                                     "tokens_slots": 0, "tokens_labels": 0, "phases": {}, "logs": [],
                                     "largest_micro_batch": None}

    def count(self, inputs: Any, padding_free: bool = False) -> None:
        """Tokens of one micro-batch: real (non-padding) tokens, tensor slots (with padding), label tokens.

        `padding_free`: the model ran the padded batch without its padding (our DPO head), so slots = real tokens."""
        d = self.data
        if isinstance(inputs, list):  # GRPO: the prompts of a generation batch; trl tokenizes and generates inside
            d["micro_batches"] += 1
            d["rows"] += len(inputs)
            return
        ids = inputs.get("input_ids")
        if ids is None:  # preference batches: prompt + chosen + rejected tensors
            ids_keys = [k for k in inputs if k.endswith("input_ids")]
            slots = sum(int(inputs[k].numel()) for k in ids_keys)
            masks = [k for k in inputs if k.endswith("attention_mask")]
            real = sum(int(inputs[k].sum()) for k in masks) if masks else slots
            rows = int(inputs[ids_keys[0]].shape[0]) if ids_keys else 0
        else:
            slots = int(ids.numel())
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else slots
            rows = int(ids.shape[0])
        if padding_free:
            slots = real
        labels = inputs.get("labels")
        labelled = 0
        if labels is not None:
            labelled = int((labels != -100).sum())
        elif inputs.get("completion_mask") is not None:  # trl's DPO batches: the scored (completion) tokens
            labelled = int(inputs["completion_mask"].sum())
        d["micro_batches"] += 1
        d["rows"] += rows
        d["tokens_real"] += real
        d["tokens_slots"] += slots
        d["tokens_labels"] += labelled
        # the micro-batch with the most tensor slots: the one a peak memory measurement belongs to
        if d["largest_micro_batch"] is None or slots > d["largest_micro_batch"]["tokens_slots"]:
            d["largest_micro_batch"] = {"rows": rows, "tokens_real": real, "tokens_slots": slots,
                                        "tokens_labels": labelled}

    def write(self) -> None:
        import json
        import os

        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def _synchronize() -> None:
    """Wait for the CUDA device to finish its queued work, where this process uses one."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _patch_trainer(module: Any, timeline: _Timeline) -> None:
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timeline.data["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            # [step, time, real tokens so far]: the rate after the first steps leaves compilation out. The device
            # finishes the step's queued work first, so that a step's time is its own (CUDA runs asynchronously).
            _synchronize()
            timeline.data["steps"].append([state.global_step, time.time(), timeline.data["tokens_real"]])
            timeline.write()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                timeline.data["losses"].append([state.global_step, float(logs["loss"])])
            if logs and "num_tokens" in logs:  # GRPO: tokens so far, completion lengths, rewards
                timeline.data["logs"].append({k: v for k, v in logs.items() if isinstance(v, (int, float))})

        def on_train_end(self, args, state, control, **kwargs):
            timeline.data["train_end"] = time.time()
            timeline.write()

    trainer_cls = module.Trainer
    original_init, original_step = trainer_cls.__init__, trainer_cls.training_step

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(ProbeCallback())

    def training_step(self, model, inputs, *args, **kwargs):
        counted = list(inputs) if isinstance(inputs, list) else dict(inputs)  # the trainer may move or pop keys
        out = original_step(self, model, inputs, *args, **kwargs)
        lm = getattr(model, "module", model)  # DDP wrapper
        lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        timeline.count(counted, padding_free=bool(getattr(lm, "_ft_ran_padding_free", False)))
        return out

    trainer_cls.__init__ = __init__
    trainer_cls.training_step = training_step


def _patch_profiling(module: Any, timeline: _Timeline) -> None:
    """trl times its GRPO phases with `ProfilingContext` (generate, reward functions, log-prob forwards, loss) and
    reports them only to trackers; add each duration to the timeline's `phases` (name -> [seconds, calls])."""
    original = module.ProfilingContext._log_metrics

    def _log_metrics(self, duration: float) -> None:
        total = timeline.data["phases"].setdefault(self.name, [0.0, 0])
        total[0] += duration
        total[1] += 1
        original(self, duration)

    module.ProfilingContext._log_metrics = _log_metrics


def install_probe(path: str) -> None:
    """Record this process's training timeline to `path` once `transformers.trainer` gets imported."""
    import importlib.abc
    import importlib.util
    import sys

    timeline = _Timeline(path)

    patches = {"transformers.trainer": _patch_trainer, "trl.extras.profiling": _patch_profiling}

    class AfterTrainerImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname not in patches:
                return None
            patch = patches.pop(fullname)
            sys.meta_path.remove(self)  # find the real spec without this finder, then come back
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                if patches:
                    sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module, timeline)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AfterTrainerImport())
