"""What a stage watches at every evaluation (`training.eval_steps`), and what it keeps.

`EvalWatch`, a trainer callback, runs after the trainer's own evaluation (eval loss): the task metrics of a sample
of `data.task_eval` (logged as `task_<metric>` into metrics.jsonl, TensorBoard and W&B), greedy answers to the
same first `eval.sample_prompts` prompts every time (`<stage>/samples.jsonl`, the report, a W&B table), then
`training.keep_best` (the best adapter so far is saved to `<stage>/best/`) and `training.early_stopping` (the stage
stops after `patience` evaluations without improvement). `finish_watch` puts the best adapter back before the stage
saves its own, and measures forgetting on `eval.general_text` against the base (the adapter disabled).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.distributed.process import is_main_process
from finetune.recipe.schema import metric_is_lower_better
from finetune.run.files import read_json, write_dir_atomic, write_json_atomic


def improved(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (lower is better for losses, higher otherwise)."""
    if best is None:
        return True
    return value < best - min_delta if metric_is_lower_better(metric) else value > best + min_delta


class EvalWatch(TrainerCallback):
    """Task sample, fixed-prompt answers, keep-best and early stopping at every evaluation (module docstring)."""

    def __init__(self, ctx, tokenizer, rows: list[dict[str, Any]], logger=None):
        t, cfg = ctx.training, ctx.recipe.eval
        self.ctx, self.tokenizer, self.logger = ctx, tokenizer, logger
        self.task_rows = rows[: cfg.sample_task_rows]
        self.prompts = rows[: cfg.sample_prompts]
        self.early = t.early_stopping
        self.keep_best = t.keep_best
        self.best_dir = ctx.dir / "best"
        self.best: dict[str, Any] = {}  # keep_best: {"metric", "value", "step"}
        self.early_best: float | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None
        if ctx.resume_from is not None:
            self.best = read_json(self.best_dir / "best.json", {}) or {}
        elif self.best_dir.exists() and is_main_process():
            shutil.rmtree(self.best_dir)  # a fresh stage: a previous attempt's best is not ours

    def active(self) -> bool:
        return bool(self.task_rows or self.prompts or self.early or self.keep_best)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        from finetune.eval.tasks import _prompt_of, generate_answers, task_metrics

        values = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        max_new = self.ctx.data.task_eval_max_new_tokens
        if self.task_rows and model is not None:
            task = task_metrics(model, self.tokenizer, self.task_rows, max_new_tokens=max_new)
            logged = {f"task_{k}": v for k, v in task.items() if k != "n"}
            values.update(logged)
            if self.logger is not None:
                self.logger.on_log(args, state, control, logs=logged)
        if self.prompts and model is not None:
            answers = generate_answers(model, self.tokenizer, [_prompt_of(r) for r in self.prompts], max_new)
            self._write_samples(state.global_step, answers)
        self._keep_best(values, state.global_step, model)
        self._early_stop(values, state, control)

    def _write_samples(self, step: int, answers: list[str]) -> None:
        if not is_main_process():
            return
        rows = [{"step": step, "prompt": _prompt_text(r), "answer": str(r.get("answer", "")), "generated": a}
                for r, a in zip(self.prompts, answers, strict=True)]
        path = self.ctx.dir / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tracker = self.ctx.tracker
        if tracker is not None and hasattr(tracker, "log_table"):
            tracker.log_table(self.ctx.stage.name, "samples", ["step", "prompt", "answer", "generated"],
                              [list(r.values()) for r in rows])

    def _keep_best(self, values: dict[str, float], step: int, model) -> None:
        metric = self.keep_best
        if not metric or metric not in values or model is None:
            return
        if not improved(values[metric], self.best.get("value"), metric):
            return
        self.best = {"metric": metric, "value": values[metric], "step": step}
        if is_main_process():
            write_dir_atomic(self.best_dir, lambda tmp: (model.save_pretrained(str(tmp), selected_adapters=["default"]),
                                                         write_json_atomic(Path(tmp) / "best.json", self.best)))

    def _early_stop(self, values: dict[str, float], state, control) -> None:
        if self.early is None or self.early.metric not in values:
            return
        value = values[self.early.metric]
        if improved(value, self.early_best, self.early.metric, self.early.min_delta):
            self.early_best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.early.patience:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            if is_main_process():
                print(f"[{self.ctx.stage.name}] early stopping at step {state.global_step}: {self.early.metric} has "
                      f"not improved on {self.early_best:.4g} for {self.bad_evals} evaluations", flush=True)


def _prompt_text(row: dict[str, Any]) -> str:
    from finetune.eval.tasks import _prompt_of

    turns = _prompt_of(row)
    return str(turns[-1]["content"]) if turns else ""


def finish_watch(watch: EvalWatch | None, model, tokenizer, ctx) -> dict[str, Any]:
    """After training: the best adapter back in `model` (keep_best), and what the summary should say about it and
    about forgetting on `eval.general_text`."""
    out: dict[str, Any] = {}
    if watch is not None and watch.stopped_at is not None:
        out["early_stopped_at"] = watch.stopped_at
    if watch is not None and watch.keep_best:
        if watch.best and (watch.best_dir / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            from finetune.model import expert_adapters

            set_peft_model_state_dict(model, load_peft_weights(str(watch.best_dir)), adapter_name="default")
            expert_adapters.load(model, watch.best_dir, trainable=True)  # finetune's own expert adapters, if any
            out["best"] = dict(watch.best)
            print(f"[{ctx.stage.name}] keep_best: the adapter of step {watch.best['step']} "
                  f"({watch.best['metric']} {watch.best['value']:.4g})", flush=True)
        else:
            out["best"] = {"metric": watch.keep_best, "step": None, "note": "never evaluated: the last adapter"}
    forgetting = stage_forgetting(model, tokenizer, ctx)
    if forgetting is not None:
        out["forgetting"] = forgetting
    return out


def best_restored(watched: dict[str, Any], trainer) -> bool:
    """True when `finish_watch` put back an adapter other than the last step's: the trainer's last evaluation is then
    not the kept adapter's and must be run again."""
    step = (watched.get("best") or {}).get("step")
    return step is not None and step != trainer.state.global_step


def stage_forgetting(model, tokenizer, ctx) -> dict[str, Any] | None:
    """Loss change and mean KL against the base (adapter disabled) on `eval.general_text`, or None without it."""
    cfg = ctx.recipe.eval
    if not cfg.general_text:
        return None
    from finetune.eval import scoring
    from finetune.eval.suite import Suite, general_samples, read_general_text

    base = scoring.adapter_off(model)
    if base is None:
        return None
    suite = Suite(general=read_general_text(cfg.general_text, cfg.max_rows), max_length=ctx.data.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    figures = {**scoring.compare(scoring.forward(model), base, general_samples(tokenizer, suite), pad),
               "base": scoring.adapter_off_words(model)}
    if cfg.max_forgetting is not None and "loss_change" in figures:
        figures.update(max_forgetting=cfg.max_forgetting, over_limit=figures["loss_change"] > cfg.max_forgetting)
    print(f"[{ctx.stage.name}] forgetting on {cfg.general_text}: loss {figures.get('loss_change', 0):+.4f} vs base, "
          f"mean KL {figures.get('mean_kl', 0):.4g}" + (" (over eval.max_forgetting)" if figures.get("over_limit")
                                                        else ""), flush=True)
    return figures


def watch_of(trainer) -> EvalWatch | None:
    """The trainer's EvalWatch, if the stage has one."""
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, EvalWatch)), None)
