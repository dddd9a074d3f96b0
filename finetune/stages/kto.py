"""KTO stage (unpaired thumbs-up/down alignment): setup -> train -> save, read top to bottom.

Data: rows of a prompt, one answer and a label (true: desirable, false: undesirable); preference pairs are split into
one desirable and one undesirable row each, with a notice (`finetune.data.align_formats`). trl's KTOTrainer estimates
the KL term from mismatched prompt/answer pairs inside each micro batch, so a micro batch needs at least 2 rows.

The reference policy is set up exactly as for DPO (`finetune.stages.dpo.install_reference`): trl's KTOTrainer, like
its DPOTrainer, runs the reference forward under the adapter named `ref` when there is one, with adapters disabled
otherwise; `kto.reference` decides which.
"""

from __future__ import annotations

import time
from typing import Any

from finetune.data import apply_template, build_dataset
from finetune.model.loading import load_tokenizer
from finetune.run.resume import guarded_train
from finetune.stages.alignment import evaluate_and_save, held_out, patch_policy, policy_model
from finetune.stages.common import StageContext, StageResult, build_stage_trainer, trainer_kwargs
from finetune.stages.dpo import install_reference, reference_folder

EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl")


def run_kto(ctx: StageContext, tokenizer=None) -> StageResult:
    """Align the adapter with labelled answers through trl's KTOTrainer; save it under `<run>/<stage>/adapter`."""
    from trl import KTOConfig as TrlKTOConfig
    from trl import KTOTrainer

    recipe, data, training, kto, name = ctx.recipe, ctx.data, ctx.training, ctx.stage.kto, ctx.stage.name

    # --- setup: tokenizer and data first (cheap, fails early), then the model with policy and reference adapters
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    apply_template(tokenizer, data)
    train_ds = build_dataset(data, tokenizer, "kto", seed=training.seed, split="train")
    eval_ds = build_dataset(data, tokenizer, "kto", seed=training.seed, split="eval")
    ref_folder = reference_folder(ctx, kto.reference)
    desirable = sum(train_ds["label"])
    print(f"[{name}] kto (beta {kto.beta}): {desirable} desirable and {len(train_ds) - desirable} undesirable answers, "
          f"weights {kto.desirable_weight} / {kto.undesirable_weight}", flush=True)
    if (warning := label_balance_warning(train_ds, kto)) is not None:
        print(f"[{name}] warning: {warning}", flush=True)
    model = policy_model(ctx, tokenizer)
    config = TrlKTOConfig(**trainer_kwargs(ctx, has_eval=eval_ds is not None), beta=kto.beta,
                          desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight,
                          max_length=data.max_length, precompute_ref_log_probs=False)
    trainer = build_stage_trainer(KTOTrainer, ctx, model, config, tokenizer, train_ds, eval_ds)
    install_reference(trainer.model, ref_folder)
    patches = patch_policy(ctx, trainer)
    reference = f"adapter {ref_folder} (frozen)" if ref_folder else "base (adapter disabled)"
    print(f"[{name}] reference policy: {reference}", flush=True)
    before = held_out(ctx, trainer.model, tokenizer)

    # --- train
    started = time.perf_counter()
    result = guarded_train(trainer, ctx)  # atomic checkpoints, --resume, Ctrl-C, NaN guard
    metrics: dict[str, Any] = {"reference": kto.reference, "reference_adapter": str(ref_folder) if ref_folder else None,
                               "beta": kto.beta, "train_loss": result.training_loss, "steps": trainer.state.global_step,
                               "train_seconds": round(time.perf_counter() - started, 1)}

    # --- held-out loss terms, save the policy adapter, then measure the held-out change
    adapter = evaluate_and_save(ctx, trainer, tokenizer, EVAL_KEYS, eval_ds is not None, before, metrics, "KTO")
    return StageResult(name=name, kind="kto", adapter=adapter, metrics=metrics, patches=patches)


def label_balance_warning(rows: Any, kto: Any) -> str | None:
    """What is off with the balance of the rows' labels (None when nothing): one kind of label only, or counts whose
    weighted sizes break the KTO paper's rule (desirable_weight x desirable between 1 and 4/3 of undesirable_weight x
    undesirable), with the weights that would keep it, as trl computes them. `rows`: a dataset with a `label` column
    or a list of labels."""
    labels = rows["label"] if hasattr(rows, "column_names") else rows
    desirable = sum(bool(x) for x in labels)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable:
        have, lack = ("desirable", "undesirable (label: false)") if desirable else (
            "undesirable", "desirable (label: true)")
        return (f"all {desirable + undesirable} answers are {have} and none {lack}: KTO weighs each kind against "
                f"the other and against the reference, so this trains on one side only (trl's weights cannot balance "
                f"it). Add {lack.split(' ')[0]} answers, or train these with an sft stage instead")
    low, u_high = undesirable * kto.undesirable_weight / desirable, desirable * kto.desirable_weight / undesirable
    high, u_low = low * 1.33, u_high / 1.33  # trl's bounds (KTOTrainer), from Eq. 8 of the KTO paper
    if low <= kto.desirable_weight <= high or u_low <= kto.undesirable_weight <= u_high:
        return None
    return (f"{desirable} desirable and {undesirable} undesirable answers with weights {kto.desirable_weight} / "
            f"{kto.undesirable_weight} break the KTO paper's balance; set kto.desirable_weight in [{low:.2f}, "
            f"{high:.2f}] or kto.undesirable_weight in [{u_low:.2f}, {u_high:.2f}] (not both)")

