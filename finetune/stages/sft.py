"""Supervised fine-tuning stage: setup -> train -> save, read top to bottom."""

from __future__ import annotations

import time

from finetune.data import apply_template, build_dataset
from finetune.data.textonly import invented_template, trains_on_text_only, without_template
from finetune.distributed.process import gathered_state_dict, is_main_process
from finetune.model import loss_heads
from finetune.model.adapters import attach, groups_text, prepare_base, trainable_groups, trainable_summary
from finetune.model.loading import load_model, load_tokenizer
from finetune.model.patches import apply_patches
from finetune.run.files import write_dir_atomic
from finetune.run.resume import guarded_train
from finetune.stages.common import (
    Phases,
    StageContext,
    StageResult,
    build_stage_trainer,
    final_evaluation,
    load_task_rows,
    padding_free_batches,
    print_patches,
    task_metric,
    task_metric_before,
    trainer_kwargs,
)
from finetune.stages.watch import best_restored, finish_watch, watch_of


def run_sft(ctx: StageContext, tokenizer=None) -> StageResult:
    """Train a LoRA adapter on chat data with trl's SFTTrainer and save it under `<run>/<stage>/adapter`."""
    from trl import SFTConfig

    recipe, data, training = ctx.recipe, ctx.data, ctx.training
    phases = Phases(ctx.stage.name)

    # --- setup: tokenizer and data first (cheap, fails early), then the model
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    text_only = trains_on_text_only(data)  # continued pretraining: the adapter ships no template invented for it
    invented = invented_template(tokenizer, data)
    apply_template(tokenizer, data)  # the recipe's chat template (may add tokens: before the model loads)
    saved_tokenizer = without_template(tokenizer) if text_only and invented else tokenizer
    stream = None
    if data.streaming:  # read, tokenized and packed while training (recipe checks: max_steps is set)
        from finetune.data.stream_train import build_stream

        train_ds, stream = build_stream(data, tokenizer, seed=training.seed, resume_from=ctx.resume_from)
    else:
        train_ds = build_dataset(data, tokenizer, "sft", seed=training.seed, split="train")
    eval_ds = build_dataset(data, tokenizer, "sft", seed=training.seed, split="eval")
    phases.done("data")
    model = load_model(recipe, training, tokenizer)
    phases.done("model" + (" + 4-bit quantization" if recipe.quantization.mode != "none" else ""))
    model = prepare_base(model, training.gradient_checkpointing)
    ranks = expert_ranks(ctx, model, train_ds)  # lora.expert_rank: by_routing
    model = attach(model, recipe.lora, ctx.init_adapter, stage=ctx.stage.name, expert_ranks=ranks)
    params = trainable_summary(model)
    print(f"[{ctx.stage.name}] adapter: {params['trainable']:,} trainable of {params['total']:,} parameters "
          f"({params['percent']}%: {groups_text(trainable_groups(model))}); "
          f"{'streamed' if data.streaming else len(train_ds)} training samples", flush=True)
    padding_free = data.packing or padding_free_batches(ctx)
    config = SFTConfig(
        **trainer_kwargs(ctx, has_eval=eval_ds is not None),
        # Our data is already cut to max_length (and packed into rows of it); trl refuses max_length with
        # padding_free unless it packs itself, so it gets None then.
        max_length=None if padding_free else data.max_length,
        padding_free=padding_free,
        packing=False,
        # tokenized, labelled and cut to max_length already (memory-mapped from the cache, or streamed): trl's own
        # preparation would only map over it again and write its results beside the cache
        dataset_kwargs={"skip_prepare_dataset": True},
        # each process reads its own shard of a stream (instead of the main process reading for all); a resumed
        # stream starts at its recorded position (finetune.data.stream_train) instead of replaying batches
        accelerator_config={"dispatch_batches": False} if stream else None,
        ignore_data_skip=stream is not None,
    )
    # trl's SFTTrainer, whose loss is the label-positions head when apply_patches installs it (else trl's own)
    trainer = build_stage_trainer(loss_heads.trainer_class(), ctx, model, config, tokenizer, train_ds, eval_ds)
    if stream is not None:
        from finetune.data.stream_train import stream_checkpoint

        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        trainer.add_callback(stream_checkpoint(stream, per_step))
    patches = apply_patches(trainer.model, recipe, ctx.stage.name, "sft", padding_free)  # kernels, attention, loss
    print_patches(ctx, patches)
    phases.done("adapters and trainer")

    task_rows = load_task_rows(data.task_eval, data.task_eval_max_rows)
    before = task_metric_before(ctx, model, tokenizer, task_rows)  # cached when the adapter is fresh
    if before is not None:
        print(f"[{ctx.stage.name}] held-out task before training: {before}", flush=True)
        phases.done("held-out measure")
    phases.show()

    # --- train
    started = time.perf_counter()
    result = guarded_train(trainer, ctx)  # atomic checkpoints, --resume, Ctrl-C, NaN guard
    train_seconds = time.perf_counter() - started
    metrics = {"train_loss": result.training_loss, "train_seconds": round(train_seconds, 1),
               "steps": trainer.state.global_step}
    watched = finish_watch(watch_of(trainer), model, tokenizer, ctx)  # keep_best, early stop, forgetting
    metrics.update(watched)
    if text_only:
        metrics["text_only"] = True  # `ft generate` completes raw text for this stage

    # --- save (atomically: a crash leaves no half-written adapter) as soon as training ends, then measure; training
    # is also in the last-step checkpoint, so an interrupted evaluation resumes at the evaluation
    adapter_dir = ctx.dir / "adapter"
    state = gathered_state_dict(trainer)  # FSDP / ZeRO-3: every process takes part in gathering the weights
    if is_main_process():  # several processes hold the same adapter; one writes it
        write_dir_atomic(adapter_dir, lambda tmp: (model.save_pretrained(str(tmp), state_dict=state),
                                                   saved_tokenizer.save_pretrained(str(tmp))))
    if eval_ds is not None:
        final = final_evaluation(trainer, reuse=not best_restored(watched, trainer))
        metrics.update({k: v for k, v in final.items() if k == "eval_loss"})
    after = task_metric(model, tokenizer, task_rows, data.task_eval_max_new_tokens)
    if after is not None:
        metrics["task_before"], metrics["task_after"] = before, after
        print(f"[{ctx.stage.name}] held-out task after training: {after}", flush=True)
    return StageResult(name=ctx.stage.name, kind="sft", adapter=str(adapter_dir), metrics=metrics, patches=patches)


ROUTING_ROWS = 64  # training rows whose routing sets the ranks of `lora.expert_rank: by_routing`


def expert_ranks(ctx: StageContext, model, train_ds) -> list[list[int]] | None:
    """`lora.expert_rank: by_routing` on a fresh adapter: each expert's share of the routed slots on the first
    `ROUTING_ROWS` training rows (the base model, one forward per row) -> its rank (`expert_adapters.ranks_by_routing`,
    the uniform total kept). A resumed stage takes the ranks its checkpoint was saved with."""
    import torch

    from finetune.eval.routing import expert_load
    from finetune.model import expert_adapters
    from finetune.model.adapters import family_traits

    lora = ctx.recipe.lora
    if lora.expert_rank != "by_routing" or ctx.init_adapter is not None or not family_traits(model).fused_experts:
        return None
    if ctx.resume_from is not None and (ranks := expert_adapters.saved_ranks(ctx.resume_from)) is not None:
        return ranks
    device = next(model.parameters()).device
    rows = train_ds[:ROUTING_ROWS]["input_ids"]
    shares = expert_load(model, [{"input_ids": torch.tensor([ids], device=device)} for ids in rows])
    ranks = expert_adapters.ranks_by_routing(shares, lora.r)
    print(f"[{ctx.stage.name}] expert ranks by routing on {len(rows)} training rows (total {lora.r} x experts per "
          f"layer): " + "; ".join(f"layer {i} {r}" for i, r in enumerate(ranks)), flush=True)
    return ranks
