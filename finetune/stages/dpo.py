"""DPO preference-alignment stage: setup -> train -> save, read top to bottom.

One copy of the (4-bit) base weights is in memory. The policy is the LoRA adapter `default`, trained from the adapter
this stage starts from. The reference policy lives on the same model, chosen by `dpo.reference`:

    sft   a second adapter `ref`: the adapter this stage starts from, loaded again from its folder and frozen
    base  no `ref` adapter: the reference forward runs with the adapter disabled
    PATH  a second adapter `ref`: the adapter in that folder, frozen

trl's DPOTrainer runs the reference forward under the adapter named `ref` when the model has one and with adapters
disabled otherwise. It also copies `default` into `ref` on its own; we replace that copy by the adapter the recipe
names (or remove it for `base`), so the reference never depends on an implicit rule of the trl version installed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from finetune.data import apply_template, build_dataset
from finetune.distributed.process import gathered_state_dict, is_main_process
from finetune.errors import FinetuneError
from finetune.model.adapters import (
    adapters_in_float32,
    attach,
    groups_text,
    prepare_base,
    trainable_groups,
    trainable_summary,
)
from finetune.model.loading import load_model, load_tokenizer
from finetune.model.patches import applied, apply_patches
from finetune.recipe.schema import DPOConfig
from finetune.run.files import write_dir_atomic
from finetune.run.records import stage_eval_at_start
from finetune.run.resume import guarded_train
from finetune.stages.common import (
    StageContext,
    StageResult,
    build_stage_trainer,
    final_evaluation,
    load_task_rows,
    padding_free_batches,
    print_patches,
    task_metric,
    trainer_kwargs,
)
from finetune.stages.watch import best_restored, finish_watch, watch_of

REF = "ref"  # the adapter name trl's DPOTrainer switches to for the reference forward
EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
TASK_KEYS = ("exact_match", "contains_answer", "concise_rate")


def run_dpo(ctx: StageContext, tokenizer=None) -> StageResult:
    """Align the adapter with preference pairs through trl's DPOTrainer; save it under `<run>/<stage>/adapter`."""
    recipe, data, training, dpo = ctx.recipe, ctx.data, ctx.training, ctx.stage.dpo
    name = ctx.stage.name

    # --- setup: tokenizer and data first (cheap, fails early), then one model carrying policy and reference
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    apply_template(tokenizer, data)  # the recipe's chat template (may add tokens: before the model loads)
    train_ds = build_dataset(data, tokenizer, "dpo", seed=training.seed, split="train")
    eval_ds = build_dataset(data, tokenizer, "dpo", seed=training.seed, split="eval")
    trainer, reference = build_trainer(ctx, tokenizer, train_ds, eval_ds)
    model = trainer.model
    params = trainable_summary(model)
    print(f"[{name}] reference policy: {reference['description']}", flush=True)
    print(f"[{name}] {describe_loss(dpo)}; adapter: {params['trainable']:,} trainable parameters "
          f"({groups_text(trainable_groups(model))}); "
          f"{len(train_ds)} training pairs", flush=True)

    task_rows = load_task_rows(data.task_eval, data.task_eval_max_rows)
    task_before = task_metric(model, tokenizer, task_rows, data.task_eval_max_new_tokens)
    eval_before = None
    if eval_ds is not None:  # a resumed stage logged it before its first step already: reuse, not log it twice
        earlier = stage_eval_at_start(ctx.metrics_path, name) if ctx.resume_from else None
        eval_before = {k: earlier[k] for k in EVAL_KEYS if k in earlier} if earlier else held_out(trainer)
    if eval_before is not None:
        print(f"[{name}] held-out pairs before training: {_fmt(eval_before)}", flush=True)

    # --- train
    started = time.perf_counter()
    result = guarded_train(trainer, ctx)  # atomic checkpoints, --resume, Ctrl-C, NaN guard
    metrics: dict[str, Any] = {"reference": dpo.reference, "reference_adapter": reference["adapter"],
                               "loss": describe_loss(dpo), "beta": dpo.beta, "train_loss": result.training_loss,
                               "train_seconds": round(time.perf_counter() - started, 1),
                               "steps": trainer.state.global_step}
    watched = finish_watch(watch_of(trainer), model, tokenizer, ctx)  # keep_best, early stop, forgetting
    metrics.update(watched)

    # --- save the policy adapter only (atomically) as soon as training ends, then measure what it does now
    adapter_dir = ctx.dir / "adapter"
    state = gathered_state_dict(trainer)  # FSDP / ZeRO-3: every process takes part in gathering the weights
    if is_main_process():  # several processes hold the same adapter; one writes it
        write_dir_atomic(adapter_dir, lambda tmp: (
            model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state),
            tokenizer.save_pretrained(str(tmp))))
    if eval_ds is not None:
        after = held_out(trainer, after_training=not best_restored(watched, trainer))
        metrics["eval_before"], metrics["eval_after"] = eval_before, after
        print(f"[{name}] held-out pairs after training: {_fmt(metrics['eval_after'])}", flush=True)
    task_after = task_metric(model, tokenizer, task_rows, data.task_eval_max_new_tokens)
    if task_after is not None:
        metrics["task_before"], metrics["task_after"] = task_before, task_after
        print(f"[{name}] held-out generation before -> after DPO: " + ", ".join(
            f"{k.replace('_', ' ')} {task_before[k]:.1%} -> {task_after[k]:.1%}" for k in TASK_KEYS if k in task_after),
            flush=True)
    return StageResult(name=name, kind="dpo", adapter=str(adapter_dir), metrics=metrics,
                       patches=applied(model))


def build_trainer(ctx: StageContext, tokenizer, train_ds, eval_ds) -> tuple[Any, dict[str, str | None]]:
    """The 4-bit (or plain) base with the policy adapter, its reference installed, wrapped in a DPOTrainer.

    Returns:
        The trainer and `{"description", "adapter"}` of the reference policy (adapter: its folder, None for base).
    """
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    recipe, dpo = ctx.recipe, ctx.stage.dpo
    ref_folder = reference_folder(ctx)
    model = load_model(recipe, ctx.training, tokenizer)
    model = prepare_base(model, ctx.training.gradient_checkpointing)
    model = attach(model, recipe.lora, ctx.init_adapter, stage=ctx.stage.name)
    config = TrlDPOConfig(
        **trainer_kwargs(ctx, has_eval=eval_ds is not None),
        beta=dpo.beta,
        **loss_terms(dpo),
        max_length=ctx.data.max_length,
        # Reference log-probs are precomputed below, after the reference adapter is in place (trl would compute
        # them inside its constructor, with its own copy of the policy as reference).
        precompute_ref_log_probs=False,
    )
    trainer = build_stage_trainer(DPOTrainer, ctx, model, config, tokenizer, train_ds, eval_ds)
    # kernels; trl's fused LM head on labelled positions only (trl scores every position off Triton devices); and as
    # trl 1.16 has no padding-free DPO, that head runs each padded batch as one padding-free row
    print_patches(ctx, apply_patches(trainer.model, recipe, ctx.stage.name, "dpo", padding_free_batches(ctx)))
    install_reference(trainer.model, ref_folder)
    if dpo.precompute_ref_log_probs:
        precompute_reference(trainer)
    if ref_folder is None:
        description = "base (the base model: adapter disabled for the reference forward)"
    elif dpo.reference == "sft":
        description = f"sft (a frozen copy of the adapter this stage starts from: {ref_folder})"
    else:
        description = f"adapter {ref_folder} (frozen)"
    if dpo.precompute_ref_log_probs:
        description += "; reference log-probs precomputed once before training"
    return trainer, {"description": description, "adapter": str(ref_folder) if ref_folder else None}


def reference_folder(ctx: StageContext, reference: str | None = None) -> Path | None:
    """The adapter folder of the reference policy (`reference`, default `dpo.reference`), or None for the base."""
    reference = reference or ctx.stage.dpo.reference
    key = f"{ctx.stage.kind}.reference"
    if reference == "base":
        return None
    if reference == "sft":
        if ctx.init_adapter is None:
            raise FinetuneError(
                f"stage '{ctx.stage.name}': {key} is 'sft' but the stage starts from a fresh adapter, so there "
                "is no SFT adapter to copy; run an sft stage before it, set init_from to an adapter folder, or use "
                f"{key}: base"
            )
        folder = Path(ctx.init_adapter)
    else:
        folder = Path(reference)
    if not (folder / "adapter_config.json").exists():
        raise FinetuneError(f"stage '{ctx.stage.name}': reference adapter {folder} has no adapter_config.json")
    return folder


def loss_terms(dpo: DPOConfig) -> dict[str, Any]:
    """trl DPOConfig loss arguments (weighted sum of trl loss types) for the recipe's loss, smoothing and NLL term.

    trl 1.x ignores `label_smoothing` for its `sigmoid` loss. Conservative DPO (cDPO),
    L = -(1 - e) log s(z) - e log s(-z) with z = beta * margin, is rebuilt exactly from two trl losses:
    sigmoid S = -log s(z) and robust R = ((1 - e)(-log s(z)) + e log s(-z)) / (1 - 2e) give L = 2(1 - e) S - (1 - 2e) R.
    `nll_weight` adds trl's `sft` loss (mean NLL of the chosen tokens) with that weight.
    """
    e = dpo.label_smoothing
    if dpo.loss_type == "sigmoid" and e > 0:
        types, weights = ["sigmoid", "robust"], [2 * (1 - e), -(1 - 2 * e)]
    else:
        types, weights = [dpo.loss_type], [1.0]
    if dpo.nll_weight > 0:
        types, weights = [*types, "sft"], [*weights, dpo.nll_weight]
    return {"loss_type": types, "loss_weights": weights, "label_smoothing": e}


def describe_loss(dpo: DPOConfig) -> str:
    """The loss in words, e.g. `sigmoid loss (beta 0.1), label smoothing 0.1, + 1.0 x NLL of the chosen answers`."""
    text = f"{dpo.loss_type} loss (beta {dpo.beta})"
    if dpo.label_smoothing:
        text += f", label smoothing {dpo.label_smoothing} (conservative DPO)"
    if dpo.nll_weight:
        text += f", + {dpo.nll_weight} x NLL of the chosen answers"
    return text


def install_reference(model, folder: Path | None) -> None:
    """Make the adapter `ref` the frozen adapter in `folder` (None: no `ref`, so the reference is the base)."""
    if REF in model.peft_config:
        model.delete_adapter(REF)
    if folder is None:
        return
    # Frozen, in float32 like the policy adapter (`adapters_in_float32`): a reference equal to the starting policy
    # gives exactly equal log-probs at step 0.
    model.load_adapter(str(folder), adapter_name=REF, is_trainable=False)
    adapters_in_float32(model)


def precompute_reference(trainer) -> None:
    """Store every pair's reference log-probs as dataset columns, then drop the reference adapter.

    Training reads `ref_chosen_logps`/`ref_rejected_logps` from the batch instead of running the reference forward
    each step (one forward less per step, and the reference weights are freed).
    """
    import torch
    from torch.utils.data import DataLoader

    model = trainer.model
    for attr in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, attr)
        if dataset is None:
            continue
        loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size,
                            collate_fn=trainer.data_collator, shuffle=False)
        chosen: list[float] = []
        rejected: list[float] = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
                c, r = trainer.compute_ref_log_probs(model, batch)
                chosen += c.float().cpu().tolist()
                rejected += r.float().cpu().tolist()
        model.train(was_training)
        setattr(trainer, attr, dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps",
                                                                                            rejected))
    trainer.precompute_ref_logps = True
    if REF in model.peft_config:
        model.delete_adapter(REF)


def held_out(trainer, after_training: bool = False) -> dict[str, float]:
    """Loss and rewards on the held-out pairs (logged to metrics.jsonl by the RunLogger as well); after training, the
    evaluation of the last step when the trainer already ran it."""
    out = final_evaluation(trainer) if after_training else trainer.evaluate()
    return {k: out[f"eval_{k}"] for k in EVAL_KEYS if f"eval_{k}" in out}


def _fmt(m: dict[str, float]) -> str:
    return (f"loss {m.get('loss', math.nan):.4f} (ln 2 = {math.log(2):.4f}), reward accuracy "
            f"{m.get('rewards/accuracies', math.nan):.1%}, mean margin {m.get('rewards/margins', math.nan):+.4f}")
