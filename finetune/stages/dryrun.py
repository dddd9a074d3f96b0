"""`ft train recipe.yaml --dry-run`: everything up to the first optimizer step, without training or writing the run.

It validates (done by the CLI), loads the tokenizer and the model exactly as training would, prepares every stage's
data, renders one sample of each split with its masked and trained tokens, counts tokens and steps, estimates the
memory of the chosen batch, checks the output folder and its free disk, and prints the plan. Nothing is written to
the run folder and no optimizer is created.

The memory figure is an estimate from the model's shapes (weights are measured on the loaded model): activations
kept for backward per token and layer, the logits and loss in fp32, the adapter's weights, gradients and optimizer
state. CUDA context and allocator fragmentation come on top (typically 0.5-1.5 GB).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe, StageConfig, TrainingConfig


@dataclass
class Memory:
    """Estimated peak memory of one training step, in bytes, by part."""

    weights: int
    adapter: int  # trainable weights + gradients + optimizer state
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits

    def lines(self) -> list[str]:
        return [f"weights {_gb(self.weights)}, adapter + grads + optimizer {_gb(self.adapter)}, activations "
                f"{_gb(self.activations)}, logits and loss {_gb(self.logits)}: about {_gb(self.total)} in all"]


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**28 else f"{n / 2**20:.1f} MB"


def steps_per_epoch(rows: int, training: TrainingConfig, processes: int = 1) -> int:
    """Optimizer steps in one pass over `rows` samples (the trainer's rounding: partial batches still count)."""
    batches = math.ceil(rows / (training.micro_batch_size * processes))
    return math.ceil(batches / training.gradient_accumulation_steps)


def total_steps(rows: int, training: TrainingConfig) -> int:
    """Optimizer steps the stage will run: `max_steps`, else epochs x steps per epoch."""
    return training.max_steps or math.ceil(training.epochs * steps_per_epoch(rows, training))


def optimizer_bytes_per_param(optimizer: str) -> int:
    """fp32 optimizer state per trainable weight: Adam keeps two moments, the 8-bit variants one byte each."""
    return 0 if optimizer == "sgd" else 2 if "8bit" in optimizer else 8


def estimate_memory(model, training: TrainingConfig, sequences: int, seq_len: int, act_bytes: int) -> Memory:
    """Peak memory of a training step over `sequences` x `seq_len` tokens.

    Per token and decoder layer, backward keeps roughly the layer input, the norm outputs, q/k/v, the attention
    output, and the MLP's gate, up, activation and product: about 6 x hidden + 2 x kv + 4 x intermediate values.
    Gradient checkpointing keeps only the layer inputs plus one layer being recomputed.
    """
    cfg = model.config
    hidden = cfg.hidden_size
    layers = cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = cfg.num_attention_heads
    kv = hidden // heads * getattr(cfg, "num_key_value_heads", heads)
    per_layer = (6 * hidden + 2 * kv + 4 * inter) * act_bytes
    tokens = sequences * seq_len
    if training.gradient_checkpointing:
        activations = tokens * (layers * hidden * act_bytes + per_layer)
    else:
        activations = tokens * layers * per_layer
    if getattr(cfg, "_attn_implementation", None) == "eager":  # eager attention keeps the s x s scores and probs
        activations += sequences * heads * seq_len * seq_len * act_bytes * 2 * (1 if training.gradient_checkpointing
                                                                                else layers)
    logits = tokens * cfg.vocab_size * 4 * 2  # fp32 logits and their gradient (the softmax of the loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * (2 * p.element_size() + optimizer_bytes_per_param(training.optimizer))
                  for p in trainable)
    return Memory(weights=int(model.get_memory_footprint()), adapter=adapter, activations=activations, logits=logits)


def _available_memory() -> tuple[str, int | None]:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return f"GPU {torch.cuda.get_device_name(0)} ({_gb(total)}, {_gb(free)} free)", free
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "CPU", None
    return f"CPU ({_gb(free)} RAM free)", free


def _dpo_lengths(tokenizer, dataset) -> list[int]:
    """Tokens of prompt + longer answer for each pair (both answers run through the model in one batch)."""
    from finetune.data.templates import render

    out = []
    for row in dataset:
        prompt = render(tokenizer, row["prompt"], generation_prompt=True)
        sides = [render(tokenizer, row["prompt"] + row[s])[len(prompt):] for s in ("chosen", "rejected")]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        out.append(n_prompt + max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sides))
    return out


def _stage_plan(recipe: Recipe, stage: StageConfig, tokenizer, model, say) -> dict[str, Any]:
    from finetune.data.build import prepare
    from finetune.data.encode import IGNORE
    from finetune.data.preview import preview_lines
    from finetune.data.templates import apply_template

    data, training = recipe.stage_data(stage), recipe.stage_training(stage)
    template = apply_template(tokenizer, data)
    plan: dict[str, Any] = {"ok": True}
    lengths: list[int] = []
    for split in ("train", "eval"):
        prepared = prepare(data, tokenizer, stage.kind, training.seed, split)
        if prepared is None:
            continue
        lines, ok = preview_lines(prepared, tokenizer, template, 1, data.max_length, color=False)
        plan["ok"] = plan["ok"] and ok
        say(f"  {split}:")
        say("\n".join(f"    {line}" for line in lines))
        if split == "train":
            ds = prepared.dataset
            plan["rows"] = len(ds)
            if stage.kind == "sft":
                lengths = [len(ids) for ids in ds["input_ids"]]
                plan["tokens"] = sum(lengths)
                plan["trained"] = sum(sum(t != IGNORE for t in labels) for labels in ds["labels"])
            else:
                lengths = _dpo_lengths(tokenizer, ds)
                plan["tokens"] = sum(lengths)
    if "rows" not in plan:
        raise FinetuneError(f"stage {stage.name}: no training data")
    steps = total_steps(plan["rows"], training)
    per_epoch = steps_per_epoch(plan["rows"], training)
    epochs = steps / max(per_epoch, 1)
    plan["steps"] = steps
    plan["tokens_seen"] = int(plan["tokens"] * epochs)
    batch = training.micro_batch_size * training.gradient_accumulation_steps
    say(f"  steps: {plan['rows']} rows / global batch {batch} (micro batch {training.micro_batch_size} x "
        f"{training.gradient_accumulation_steps} accumulation) = {per_epoch} steps per epoch -> {steps} steps "
        f"({epochs:.2f} epochs{', max_steps' if training.max_steps else ''})")
    what = f", {plan['trained']:,} trained" if "trained" in plan else " (prompt + the longer answer of each pair)"
    say(f"  tokens: {plan['tokens']:,} per epoch{what}; about {plan['tokens_seen']:,} processed in training")
    sequences = training.micro_batch_size * (2 if stage.kind == "dpo" else 1)  # DPO: chosen and rejected together
    seq_len = data.max_length if data.packing else min(max(lengths, default=1), data.max_length)
    from finetune.model.loading import resolve_precision

    act_bytes = 4 if resolve_precision(training) == "fp32" else 2
    memory = estimate_memory(model, training, sequences, seq_len, act_bytes)
    plan["memory"] = memory.total
    say(f"  memory for {sequences} x {seq_len} tokens per micro batch (estimate): {memory.lines()[0]}")
    from finetune.run.checkpoints import next_checkpoint_step, schedule_text

    first = next_checkpoint_step(training, 0, per_epoch, steps)
    clock = f" or after {training.save_minutes:g} min of training, whichever is first" if training.save_minutes else ""
    say(f"  checkpoints: {schedule_text(training, per_epoch, steps)}; the first at step {first}{clock}")
    return plan


def _output_status(recipe: Recipe) -> str:
    from finetune.run.files import read_json
    from finetune.run.resume import check_writable

    run_dir = recipe.output_dir()
    check_writable(run_dir)
    summary = read_json(run_dir / "summary.json", None)
    if summary is None:
        return f"{run_dir} (new)"
    status = summary.get("status")
    if status == "finished":
        return f"{run_dir} holds a finished run: training needs --overwrite or --from-stage"
    return f"{run_dir} holds an unfinished run ({status}): continue it with --resume, or --overwrite"


def dry_run(recipe: Recipe, say=print) -> dict[str, Any]:
    """Print the plan of a recipe (see the module docstring) and return its figures. Trains nothing.

    Raises:
        FinetuneError: a data check failed, the output folder is not writable, or the data is unusable.
    """
    from finetune.model.adapters import attach, prepare_base, trainable_summary
    from finetune.model.loading import load_model, load_tokenizer

    say("dry run: nothing is trained and the run folder is not written")
    say(f"output: {_output_status(recipe)}")
    tokenizer = load_tokenizer(recipe.model)
    stages = recipe.effective_stages()
    # the chat template may add tokens: apply the first stage's before the model loads, as training does
    from finetune.data.templates import apply_template

    apply_template(tokenizer, recipe.stage_data(stages[0]))
    model = load_model(recipe, recipe.stage_training(stages[0]), tokenizer)
    first = recipe.stage_training(stages[0])
    model = prepare_base(model, recipe.quantization.mode != "none", first.gradient_checkpointing)
    model = attach(model, recipe.lora)
    params = trainable_summary(model)
    say(f"model: {recipe.model.name_or_path} (quantization {recipe.quantization.mode}), {params['total']:,} "
        f"parameters; adapter r={recipe.lora.r}: {params['trainable']:,} trainable ({params['percent']}%)")
    where, free = _available_memory()
    say(f"device: {where}")
    plans = {}
    for i, stage in enumerate(stages):
        say(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.kind})")
        plans[stage.name] = _stage_plan(recipe, stage, tokenizer, model, say)
    peak = max(p["memory"] for p in plans.values())
    steps = sum(p["steps"] for p in plans.values())
    tokens = sum(p["tokens_seen"] for p in plans.values())
    say(f"plan: {len(stages)} stage(s), {steps:,} optimizer steps, about {tokens:,} tokens; peak memory about "
        f"{_gb(peak)}")
    if free is not None and peak > free:
        say(f"warning: the estimate ({_gb(peak)}) exceeds the free memory ({_gb(free)}); lower micro_batch_size, "
            "data.max_length, or turn on gradient_checkpointing / quantization")
    from finetune.run.checkpoints import checkpoint_bytes

    needed = max(checkpoint_bytes(params["trainable"], recipe.stage_training(s).optimizer) *
                 (recipe.stage_training(s).save_total_limit + 1) for s in stages)
    disk_free = shutil.disk_usage(_existing(recipe.output_dir())).free
    say(f"disk: checkpoints need up to {_gb(needed)}, {_gb(disk_free)} free")
    if disk_free < needed * 1.1:  # `ft train` refuses this before its first step (finetune.run.checkpoints)
        say("warning: not enough free disk for the checkpoints; `ft train` will refuse to start. Free some space, "
            "point output.dir at a larger disk, or lower training.save_total_limit")
    failed = [name for name, p in plans.items() if not p["ok"]]
    if failed:
        raise FinetuneError(f"data checks failed for stage(s) {', '.join(failed)} (see FAIL above)")
    return {"steps": steps, "tokens": tokens, "peak_memory": peak, "stages": plans}


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
