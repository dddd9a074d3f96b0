"""`ft train recipe.yaml --dry-run`: everything up to the first optimizer step, without training or writing the run.

It validates (done by the CLI), loads the tokenizer and the model exactly as training would, prepares every stage's
data, renders one sample of each split with its masked and trained tokens, counts tokens and steps, estimates the
memory of the chosen batch, checks the output folder and its free disk, and prints the plan. Nothing is written to
the run folder and no optimizer is created.

The memory figure is built from parts (`finetune.stages.memory`) for the path that will run (label-positions loss
or trl's, checkpointing or not) at the longest micro-batch of the data; the weights and the trainable count come from
the loaded model's shapes. CUDA context and allocator fragmentation come on top (typically 0.5-1.5 GB).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe, StageConfig, TrainingConfig
from finetune.stages.memory import gb as _gb


def steps_per_epoch(rows: int, training: TrainingConfig, processes: int = 1) -> int:
    """Optimizer steps in one pass over `rows` samples (the trainer's rounding: partial batches still count)."""
    batches = math.ceil(rows / (training.micro_batch_size * processes))
    return math.ceil(batches / training.gradient_accumulation_steps)


def total_steps(rows: int, training: TrainingConfig) -> int:
    """Optimizer steps the stage will run: `max_steps`, else epochs x steps per epoch."""
    return training.max_steps or math.ceil(training.epochs * steps_per_epoch(rows, training))


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


_LENGTH_WORDS = {"kto": "prompt + answer of each row", "grpo": "prompt + grpo.max_completion_length per completion",
                 "pairs": "prompt + the longer answer of each pair"}


def _alignment_lengths(stage: StageConfig, tokenizer, dataset) -> list[int]:
    """Tokens per sequence of an alignment stage's rows (see `_LENGTH_WORDS`)."""
    if stage.kind not in ("kto", "grpo"):
        return _dpo_lengths(tokenizer, dataset)
    from finetune.data.templates import render

    out = []
    for row in dataset:
        prompt = render(tokenizer, row["prompt"], generation_prompt=True)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if stage.kind == "grpo":
            out.append(n + stage.grpo.max_completion_length)
        else:
            out.append(len(tokenizer(render(tokenizer, row["prompt"] + row["completion"]),
                                     add_special_tokens=False)["input_ids"]))
    return out


def _length_search(recipe: Recipe, stage: StageConfig, model, cap: int, plan: dict[str, Any], say) -> int | None:
    """`--max-length-search CAP`: the longest sample whose training step fits CAP by the estimate, and its parts."""
    from finetune.stages.length_search import longest_fitting

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = plan["trained"] / plan["tokens"] if plan.get("trained") and plan.get("tokens") else 1.0
    found = longest_fitting(model.config, recipe, stage, cap, trainable=trainable, labelled_share=share)
    if found is None:
        say(f"  longest sample within {_gb(cap)} (estimate): none; the weights and optimizer state alone take more")
        return None
    length, memory = found
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(cfg, "max_position_embeddings", None)
    micro = recipe.stage_training(stage).micro_batch_size
    limit = " (the model's context)" if context and length >= context else ""
    say(f"  longest sample within {_gb(cap)} (estimate, micro batch {micro}, {share:.0%} of tokens labelled): "
        f"{length:,} tokens{limit}; data.max_length is {recipe.stage_data(stage).max_length:,}. At that length: "
        f"{memory.line()}")
    return length


def _stage_plan(recipe: Recipe, stage: StageConfig, tokenizer, model, say,
                length_cap: int | None = None) -> dict[str, Any]:
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
                lengths = _alignment_lengths(stage, tokenizer, ds)
                plan["tokens"] = sum(lengths) * (stage.grpo.num_generations if stage.kind == "grpo" else 1)
    if "rows" not in plan:
        raise FinetuneError(f"stage {stage.name}: no training data")
    if stage.kind == "sft" and lengths:
        _routing(model, ds["input_ids"][:16], plan, say)
    # grpo: the batch counts completions, num_generations per prompt row
    samples = plan["rows"] * (stage.grpo.num_generations if stage.kind == "grpo" else 1)
    steps = total_steps(samples, training)
    per_epoch = steps_per_epoch(samples, training)
    epochs = steps / max(per_epoch, 1)
    plan["steps"] = steps
    plan["tokens_seen"] = int(plan["tokens"] * epochs)
    batch = training.micro_batch_size * training.gradient_accumulation_steps
    rows = f"{plan['rows']} rows" + (f" x {stage.grpo.num_generations} completions" if stage.kind == "grpo" else "")
    say(f"  steps: {rows} / global batch {batch} (micro batch {training.micro_batch_size} x "
        f"{training.gradient_accumulation_steps} accumulation) = {per_epoch} steps per epoch -> {steps} steps "
        f"({epochs:.2f} epochs{', max_steps' if training.max_steps else ''})")
    what = f", {plan['trained']:,} trained" if "trained" in plan else f" ({_LENGTH_WORDS.get(stage.kind, 'pairs')})"
    say(f"  tokens: {plan['tokens']:,} per epoch{what}; about {plan['tokens_seen']:,} processed in training")
    from finetune.stages.memory import recipe_estimate, sequences_per_micro_batch

    # pairs: chosen and rejected together; kto: each answer and a mismatched one for the KL estimate; grpo: the micro
    # batch counts completions
    sequences = sequences_per_micro_batch(stage.kind, training.micro_batch_size)
    seq_len = data.max_length if data.packing else min(max(lengths, default=1), data.max_length)
    memory = recipe_estimate(model.config, recipe, stage, seq_len=seq_len,
                             trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    plan["memory"] = memory.total
    plan["memory_parts"] = memory
    say(f"  memory for {sequences} x {seq_len} tokens per micro batch (estimate): {memory.line()}")
    if length_cap is not None:
        plan["longest_fitting"] = _length_search(recipe, stage, model, length_cap, plan, say)
    from finetune.run.checkpoints import next_checkpoint_step, schedule_text

    first = next_checkpoint_step(training, 0, per_epoch, steps)
    clock = f" or after {training.save_minutes:g} min of training, whichever is first" if training.save_minutes else ""
    say(f"  checkpoints: {schedule_text(training, per_epoch, steps)}; the first at step {first}{clock}")
    return plan


def _routing(model, rows: list[list[int]], plan: dict[str, Any], say) -> None:
    """A MoE model's expert load on the first training rows (`finetune.eval.routing`), one forward per row."""
    import torch

    from finetune.eval.routing import expert_load, load_line
    from finetune.model.adapters import family_traits

    if not family_traits(model).fused_experts:
        return
    device = next(model.parameters()).device
    shares = expert_load(model, [{"input_ids": torch.tensor([ids], device=device)} for ids in rows])
    plan["expert_load"] = shares.tolist()
    say(f"  {load_line(shares, len(rows))}")


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


def dry_run(recipe: Recipe, say=print, length_cap: int | None = None) -> dict[str, Any]:
    """Print the plan of a recipe (see the module docstring) and return its figures. Trains nothing.

    `length_cap` (bytes, `--max-length-search`): also print, per stage, the longest sample length whose training
    step fits that memory by the estimate.

    Raises:
        FinetuneError: a data check failed, the output folder is not writable, or the data is unusable.
    """
    from finetune.model.adapters import attach, groups_text, prepare_base, trainable_groups, trainable_summary
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
    model = prepare_base(model, first.gradient_checkpointing)
    model = attach(model, recipe.lora)
    params = trainable_summary(model)
    from finetune.model.adapters import family_traits

    experts = ""
    if family_traits(model).fused_experts and recipe.quantization.mode != "none":
        experts = ", experts in NF4" if recipe.quantization.experts else ", experts not quantized"
    say(f"model: {recipe.model.name_or_path} (quantization {recipe.quantization.mode}{experts}), {params['total']:,} "
        f"parameters; adapter r={recipe.lora.r}: {params['trainable']:,} trainable ({params['percent']}%: "
        f"{groups_text(trainable_groups(model))})")
    where, free = _available_memory()
    say(f"device: {where}")
    plans = {}
    for i, stage in enumerate(stages):
        say(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.kind})")
        plans[stage.name] = _stage_plan(recipe, stage, tokenizer, model, say, length_cap)
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
