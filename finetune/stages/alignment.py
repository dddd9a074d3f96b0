"""What the alignment stages beyond DPO share (kto, orpo, simpo, cpo, grpo): the policy model, the held-out measure
before and after, and saving the policy adapter.

The held-out measure reads the stage's `data.task_eval` rows: greedy answers scored against their `answer` (exact
match, conciseness; `finetune.eval.tasks`) and, for rows that carry a chosen and a rejected answer, the preference
accuracy (`finetune.eval.preference`). The same rows and measure for every method, so their figures compare.
"""

from __future__ import annotations

from typing import Any

from finetune.data.formats import to_messages
from finetune.distributed.process import gathered_state_dict, is_main_process
from finetune.model.adapters import attach, prepare_base
from finetune.model.loading import load_model
from finetune.model.patches import apply_patches
from finetune.run.files import write_dir_atomic
from finetune.stages.common import StageContext, load_task_rows, print_patches, task_metric

TASK_KEYS = ("exact_match", "concise_rate")
PAIR_KEYS = ("preference_accuracy", "preference_accuracy_total")


def policy_model(ctx: StageContext, tokenizer):
    """The (4-bit) base with the adapter this stage starts from (or a fresh one): the policy. Patch it with
    `patch_policy` once the trainer is built."""
    model = load_model(ctx.recipe, ctx.training, tokenizer)
    model = prepare_base(model, ctx.training.gradient_checkpointing)
    return attach(model, ctx.recipe.lora, ctx.init_adapter, stage=ctx.stage.name)


def evaluate_and_save(ctx: StageContext, trainer, tokenizer, eval_keys: tuple[str, ...], has_eval: bool,
                      before: dict[str, Any] | None, metrics: dict[str, Any], method: str) -> str:
    """After training: the held-out loss terms (`eval_after`), the policy adapter saved, and the held-out measure
    before and after (`task_before`, `task_after`) added to `metrics`, printed. Returns the adapter folder."""
    if has_eval:
        out = trainer.evaluate()
        metrics["eval_after"] = {k: out[f"eval_{k}"] for k in eval_keys if f"eval_{k}" in out}
    adapter = save_policy(ctx, trainer, tokenizer)
    after = held_out(ctx, trainer.model, tokenizer)
    if before is not None and after is not None:
        metrics["task_before"], metrics["task_after"] = before, after
        print(f"[{ctx.stage.name}] held-out before -> after {method}: {describe_change(before, after)}", flush=True)
    return adapter


def patch_policy(ctx: StageContext, trainer) -> list[str]:
    """The recipe's kernels on the trainer's model (`finetune.model.patches`; trl's own loss stays), printed; the
    model's record, for the stage summary."""
    patches = apply_patches(trainer.model, ctx.recipe, ctx.stage.name, "trl", padding_free=False)
    print_patches(ctx, patches)
    return patches


def held_out(ctx: StageContext, model, tokenizer, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Task metrics (and preference accuracy for pair rows) on the stage's `task_eval` rows; None without them."""
    rows = load_task_rows(ctx.data.task_eval, ctx.data.task_eval_max_rows) if rows is None else rows
    if not rows:
        return None
    out: dict[str, Any] = {}
    if all("answer" in r for r in rows):
        out.update(task_metric(model, tokenizer, rows, ctx.data.task_eval_max_new_tokens) or {})
    pairs = [p for p in (_pair(r) for r in rows) if p is not None]
    if pairs:
        from finetune.eval.preference import preference_accuracy

        out.update(preference_accuracy(model, tokenizer, pairs, batch_size=ctx.training.micro_batch_size))
    return out or None


def describe_change(before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...] = TASK_KEYS + PAIR_KEYS
                    ) -> str:
    """`exact match 45.0% -> 80.0%, ...` for the keys both measures have."""
    return ", ".join(f"{k.replace('_', ' ')} {before[k]:.1%} -> {after[k]:.1%}" for k in keys
                     if k in before and k in after)


def save_policy(ctx: StageContext, trainer, tokenizer) -> str:
    """Write the policy adapter `default` (not a reference adapter) atomically to `<stage>/adapter`; its path."""
    adapter_dir = ctx.dir / "adapter"
    state = gathered_state_dict(trainer)  # FSDP / ZeRO-3: every process takes part in gathering the weights
    if is_main_process():  # several processes hold the same adapter; one writes it
        write_dir_atomic(adapter_dir, lambda tmp: (
            trainer.model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state),
            tokenizer.save_pretrained(str(tmp))))
    return str(adapter_dir)


def _pair(row: dict[str, Any]) -> dict[str, Any] | None:
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        return None
    prompt, chosen = to_messages(row["prompt"], "user"), to_messages(row["chosen"], "assistant")
    rejected = to_messages(row["rejected"], "assistant")
    if any(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
