"""GRPO stage (online RL against computed rewards): setup -> train -> save, read top to bottom.

Each step trl's GRPOTrainer samples `grpo.num_generations` completions per prompt from the current policy (rendered
with the chat template; transformers' generate on CPU or GPU, vLLM only when the recipe asks and it is installed),
scores them with the recipe's rewards (`finetune.stages.rewards`), turns the weighted sum into advantages normalised
within each prompt's group, and takes a clipped policy-gradient step with a KL penalty (`grpo.beta`) to the reference
policy. The reference is set up as for DPO: the adapter `ref` (a frozen copy of the starting adapter, or another
adapter folder), or the base with adapters disabled (`grpo.reference: base`).

The held-out measure: greedy answers to the `task_eval` prompts, scored by exact match and by the stage's own rewards
(mean weighted reward), before and after.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from typing import Any

from finetune.data import apply_template, build_dataset
from finetune.errors import FinetuneError
from finetune.model.loading import load_tokenizer
from finetune.run.resume import guarded_train
from finetune.stages.alignment import patch_policy, policy_model, save_policy
from finetune.stages.common import StageContext, StageResult, build_stage_trainer, load_task_rows, trainer_kwargs
from finetune.stages.dpo import install_reference, reference_folder
from finetune.stages.reward_code import module_file
from finetune.stages.rewards import build_rewards, check_reward_data


def loss_settings(grpo) -> dict:
    """The recipe's GRPO loss choices in trl's GRPOConfig words."""
    return {"loss_type": grpo.loss_type, "importance_sampling_level": grpo.importance_sampling,
            "scale_rewards": grpo.scale_rewards}


def run_grpo(ctx: StageContext, tokenizer=None) -> StageResult:
    """Train the adapter against the recipe's rewards with trl's GRPOTrainer; save it under `<run>/<stage>/adapter`."""
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    recipe, data, training, grpo, name = ctx.recipe, ctx.data, ctx.training, ctx.stage.grpo, ctx.stage.name

    # --- setup: prompts, rewards (user functions imported) and generation backend first, then the model
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    apply_template(tokenizer, data)
    train_ds = build_dataset(data, tokenizer, "grpo", seed=training.seed, split="train")
    check_reward_data(grpo, train_ds, f"stage '{name}' data.train")
    rewards, weights = build_rewards(grpo)
    if grpo.use_vllm and importlib.util.find_spec("vllm") is None:
        raise FinetuneError(f"stage '{name}': grpo.use_vllm is true but the vllm package is not installed; install "
                            "it (GPU only) or set grpo.use_vllm: false to generate with transformers")
    ref_folder = reference_folder(ctx, grpo.reference) if grpo.beta > 0 else None
    print(f"[{name}] grpo: {grpo.num_generations} completions per prompt, up to {grpo.max_completion_length} tokens, "
          f"temperature {grpo.temperature}, beta {grpo.beta}, loss {grpo.loss_type} ({grpo.importance_sampling}-level "
          f"ratios, rewards scaled by {grpo.scale_rewards}); rewards "
          + ", ".join(f"{f.__name__} x {w}" for f, w in zip(rewards, weights, strict=True))
          + f"; {len(train_ds)} prompts; generation with {'vLLM' if grpo.use_vllm else 'transformers'}", flush=True)
    code = [f"{spec.function} ({module_file(spec.function.partition(':')[0])})" for spec in grpo.rewards
            if spec.kind == "python"]
    if code:
        print(f"[{name}] runs your Python code (grpo.allow_reward_code): {', '.join(code)}", flush=True)
    model = policy_model(ctx, tokenizer)
    config = TrlGRPOConfig(
        **trainer_kwargs(ctx, has_eval=False),  # held-out generation is measured below, not by trl's eval loop
        beta=grpo.beta,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        **loss_settings(grpo),
        reward_weights=weights,
        use_vllm=grpo.use_vllm,
        vllm_mode="colocate",
        shuffle_dataset=data.shuffle,
    )
    trainer_cls = functools.partial(GRPOTrainer, reward_funcs=rewards)
    trainer = build_stage_trainer(trainer_cls, ctx, model, config, tokenizer, train_ds, None)
    patches = patch_policy(ctx, trainer)
    if grpo.beta > 0:
        install_reference(trainer.model, ref_folder)
        print(f"[{name}] reference policy: " + (f"adapter {ref_folder} (frozen)" if ref_folder else
                                                 "base (adapter disabled)"), flush=True)
    task_rows = load_task_rows(data.task_eval, data.task_eval_max_rows)
    before = held_out_rewards(trainer.model, tokenizer, task_rows, rewards, weights, data.task_eval_max_new_tokens)

    # --- train
    started = time.perf_counter()
    result = guarded_train(trainer, ctx)  # atomic checkpoints, --resume, Ctrl-C, NaN guard
    seconds = time.perf_counter() - started
    logged = [r for r in trainer.state.log_history if "reward" in r]
    metrics: dict[str, Any] = {
        "reference": grpo.reference if grpo.beta > 0 else None, "beta": grpo.beta,
        "rewards": [f.__name__ for f in rewards], "train_loss": result.training_loss,
        "steps": trainer.state.global_step, "train_seconds": round(seconds, 1),
        "completions": trainer.state.global_step * training.micro_batch_size * training.gradient_accumulation_steps,
    }
    metrics["completions_per_second"] = round(metrics["completions"] / max(seconds, 1e-9), 2)
    if logged:
        metrics["train_reward_first"], metrics["train_reward_last"] = logged[0]["reward"], logged[-1]["reward"]

    # --- save the policy adapter, then measure the held-out change
    adapter = save_policy(ctx, trainer, tokenizer)
    after = held_out_rewards(trainer.model, tokenizer, task_rows, rewards, weights, data.task_eval_max_new_tokens)
    if before is not None and after is not None:
        metrics["task_before"], metrics["task_after"] = before, after
        print(f"[{name}] held-out before -> after GRPO: exact match {before['exact_match']:.1%} -> "
              f"{after['exact_match']:.1%}, mean reward {before['mean_reward']:.3f} -> {after['mean_reward']:.3f}",
              flush=True)
    return StageResult(name=name, kind="grpo", adapter=adapter, metrics=metrics, patches=patches)


def held_out_rewards(model, tokenizer, rows: list[dict[str, Any]], rewards: list, weights: list[float],
                     max_new_tokens: int) -> dict[str, Any] | None:
    """Greedy answers to held-out prompts: exact match, conciseness, and the mean weighted reward (None: no rows)."""
    if not rows:
        return None
    from finetune.eval.tasks import _prompt_of, task_metrics

    scored = task_metrics(model, tokenizer, rows, max_new_tokens=max_new_tokens, return_predictions=True)
    prompts = [_prompt_of(r) for r in rows]
    completions = [[{"role": "assistant", "content": p}] for p in scored.pop("predictions")]
    answers = [r.get("answer") for r in rows]
    total = [0.0] * len(rows)
    for func, weight in zip(rewards, weights, strict=True):
        for i, value in enumerate(func(prompts=prompts, completions=completions, answer=answers)):
            total[i] += weight * value
    return {**scored, "mean_reward": sum(total) / len(total)}
