"""What every stage shares: its context, trainer arguments from the recipe, and the held-out task metric."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.distributed.plan import batch_plan, trainer_distributed_kwargs
from finetune.distributed.process import is_main_process
from finetune.model.loading import resolve_precision
from finetune.recipe.schema import DataConfig, Recipe, StageConfig, TrainingConfig


@dataclass
class StageContext:
    """Everything a stage needs: the typed recipe, which stage, where it writes, what it starts from."""

    recipe: Recipe
    stage: StageConfig
    run_dir: Path
    init_adapter: Path | None  # adapter folder this stage starts from (None: a fresh adapter; DPO's `sft` reference)
    resume_from: Path | None = None  # checkpoint to continue from (`ft train --resume`); see finetune.run.resume
    tracker: Any = None  # the run's finetune.run.tracking.Tracker (W&B), fed by the stage's RunLogger

    @property
    def dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def training(self) -> TrainingConfig:
        return self.recipe.stage_training(self.stage)

    @property
    def data(self) -> DataConfig:
        return self.recipe.stage_data(self.stage)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


@dataclass
class StageResult:
    """What a finished stage reports; written to `<stage>/summary.json`."""

    name: str
    kind: str
    adapter: str
    metrics: dict[str, Any] = field(default_factory=dict)
    patches: list[str] = field(default_factory=list)  # what was changed on the model, in order (model/patches.py)
    # attention calls of this process by the path that ran (finetune.model.attention.attention_calls)
    attention_calls: dict[str, int] = field(default_factory=dict)
    # tiled MLP forwards of this process and their tiles (finetune.model.tiled_mlp.tiled_calls); empty: none tiled
    tiled_mlp_calls: dict[str, int] = field(default_factory=dict)


def print_patches(ctx: StageContext, patches: list[str]) -> None:
    """The stage banner's lines for the model's patches (`finetune.model.patches.apply_patches`), in order."""
    for line in patches:
        print(f"[{ctx.stage.name}] {line}", flush=True)


def trainer_kwargs(ctx: StageContext, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by trl's SFTConfig and DPOConfig, each taken from the typed recipe."""
    t = ctx.training
    precision = resolve_precision(t)
    batch = batch_plan(t, ctx.recipe.distributed)  # the same global batch whatever the process count
    if batch.processes > 1 and is_main_process():
        print(f"[{ctx.stage.name}] {batch}", flush=True)
    return dict(
        output_dir=str(ctx.dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=batch.micro_batch_size,
        per_device_eval_batch_size=batch.micro_batch_size,
        gradient_accumulation_steps=batch.accumulation,
        **trainer_distributed_kwargs(ctx.recipe),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the NaN guard, not be averaged away
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[],  # RunLogger feeds metrics.jsonl, W&B and TensorBoard itself (finetune.run.tracking)
        run_name=ctx.recipe.name,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def load_task_rows(path: str | None, max_rows: int | None = None, check: bool = True) -> list[dict[str, Any]]:
    """Rows of a `task_eval` file (a prompt or messages, and an answer), normalised and (with `check`) checked as
    `ft eval` reads them (`finetune.eval.taskrows`): the first `max_rows` of them (None: all)."""
    if not path:
        return []
    from finetune.eval.taskrows import load_task_file

    return load_task_file(path, "data.task_eval", ["exact_match"] if check else None, max_rows=max_rows)


def task_metric(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any] | None:
    """Held-out task metrics by greedy generation (exact match and friends), or None without task rows."""
    if not rows:
        return None
    from finetune.eval.tasks import task_metrics

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return task_metrics(model, tokenizer, rows, max_new_tokens=max_new_tokens, progress=_progress_printer())
    finally:
        model.train(was_training)


def _progress_printer(after_s: float = 5.0):
    """Prints `[held-out] 64/200 answers, 21 s` after each generation batch once the measure runs past `after_s`."""
    started = time.perf_counter()

    def show(done: int, total: int) -> None:
        took = time.perf_counter() - started
        if took >= after_s:
            eta = took / done * (total - done) if done else 0.0
            print(f"[held-out] {done}/{total} answers, {took:.0f} s" + (f", ~{eta:.0f} s left" if done < total else ""),
                  flush=True)

    return show


def quiet_trainer(trainer) -> None:
    """Drop the trainer's own console printer: RunLogger shows progress and writes the metrics."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def padding_free_batches(ctx: StageContext) -> bool:
    """`data.padding_free`, except for models loaded with `trust_remote_code` (their attention code may ignore the
    restarting positions), which is then said."""
    if ctx.data.padding_free and ctx.recipe.model.trust_remote_code:
        print(f"[{ctx.stage.name}] padding-free batches off: trust_remote_code models may attend across samples",
              flush=True)
        return False
    return ctx.data.padding_free


def build_stage_trainer(trainer_cls: Any, ctx: StageContext, model, config, tokenizer, train_ds, eval_ds):
    """A stage's trl trainer: our metrics logger, a quiet console, and float32 adapters that start exactly where the
    adapter the stage starts from ended (`finetune.model.adapters.adapters_in_float32`: trl casts them to bf16)."""
    from finetune.model.adapters import adapters_in_float32
    from finetune.run.tracking import RunLogger
    from finetune.stages.watch import EvalWatch

    logger = RunLogger(ctx.metrics_path, ctx.stage.name)
    trainer = trainer_cls(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=[logger])
    quiet_trainer(trainer)
    # task sample, fixed-prompt answers, keep_best, early stopping (finetune.stages.watch)
    watch = EvalWatch(ctx, tokenizer, load_task_rows(ctx.data.task_eval, ctx.data.task_eval_max_rows), logger)
    if watch.active() and eval_ds is not None:
        trainer.add_callback(watch)
    adapters_in_float32(trainer.model, ctx.init_adapter)
    return trainer


def final_evaluation(trainer, reuse: bool = True) -> dict[str, float]:
    """The held-out metrics after training (`eval_*` keys): the evaluation the trainer already ran at the last step
    (when `eval_steps` divides the step count and `reuse`), or a new one. Evaluating twice would cost time and log a
    second row; pass `reuse=False` when the weights changed since (keep_best put back an earlier adapter)."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history if reuse else []):
        if entry.get("step") != step:
            break
        if "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()


def quiet_library_noise() -> None:
    """Silence what is not the user's business (keep the rest): transformers' notices that it renamed
    `gradient_checkpointing` (we pass the name the pinned trl accepts), and bitsandbytes' note that an optional CPU
    kernel package (`kernels`) is not installed."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def task_metric_before(ctx: StageContext, model, tokenizer, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The held-out measure before training. A stage that starts from a fresh adapter (LoRA B = 0) is the base model
    itself, so its measure is kept in the data cache, keyed by the base's files, quantization, template and rows:
    the next run of the same base and task starts training at once (generation is minutes on a real model)."""
    if not rows:
        return None
    key = _before_key(ctx, tokenizer, rows) if ctx.init_adapter is None and ctx.data.cache_dir else None
    path = Path(ctx.data.cache_dir) / "measures" / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            print(f"[{ctx.stage.name}] held-out task before training: the base model's measure of an earlier run "
                  f"(same base, quantization, template and rows; {path.name[:12]}), not generated again", flush=True)
            return cached
        except (OSError, ValueError):
            pass
    measured = task_metric(model, tokenizer, rows, ctx.data.task_eval_max_new_tokens)
    if path is not None and measured is not None and is_main_process():
        from finetune.run.files import write_json_atomic

        write_json_atomic(path, measured)
    return measured


def _before_key(ctx: StageContext, tokenizer, rows: list[dict[str, Any]]) -> str | None:
    import hashlib

    from finetune.run.manifest import model_record

    base = model_record(ctx.recipe)
    fingerprint = base.get("files_sha256") or base.get("hub_commit")
    if not fingerprint:  # nothing says the base is the same as last time
        return None
    parts = {"base": [base.get("name_or_path"), fingerprint, base.get("weights")],
             "quantization": ctx.recipe.quantization.model_dump(), "dtype": ctx.recipe.model.dtype,
             "template": getattr(tokenizer, "chat_template", None), "eos": tokenizer.eos_token,
             "max_new_tokens": ctx.data.task_eval_max_new_tokens, "rows": rows}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


class Phases:
    """Seconds spent in each start-up phase of a stage, printed on one line before the first step (where a slow
    start goes: data, model loading and 4-bit quantization, the held-out measure)."""

    def __init__(self, stage: str) -> None:
        self.stage, self.started, self.last, self.parts = stage, time.perf_counter(), time.perf_counter(), []

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.parts.append((what, now - self.last))
        self.last = now

    def show(self) -> None:
        total = time.perf_counter() - self.started
        print(f"[{self.stage}] start-up {total:.1f} s: " + ", ".join(f"{w} {s:.1f} s" for w, s in self.parts),
              flush=True)
