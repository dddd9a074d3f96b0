"""Reference-free preference stages on pairs: ORPO, SimPO and CPO. setup -> train -> save, read top to bottom.

No reference model: each pair costs one forward of the policy (chosen and rejected in one batch), and only the policy
adapter is in memory beside the (4-bit) base.

    orpo   trl's ORPOTrainer: NLL of the chosen answer + beta x log-sigmoid of the log odds ratio chosen/rejected
    simpo  trl's CPOTrainer with loss_type `simpo`: -log s(beta x (mean log-prob chosen - mean log-prob rejected)
           - gamma), the log-probs averaged per token; `simpo.nll_weight` (trl's `cpo_alpha`) adds the chosen NLL
    cpo    trl's CPOTrainer: a DPO-style loss on the policy's own log-probs + the chosen NLL (behaviour cloning)

Both trainers live in `trl.experimental` in trl 1.16. Given conversations, they render each answer as the chat
template's text after the prompt and then append the eos token unless the answer's last token is eos. Templates
put a separator after the end-of-turn token (the tiny model's and ChatML's `<|im_end|>\n`), so trl would train
on `answer<|im_end|>\n<|im_end|>`: two tokens the model never produces, whose log-probs (about -8 nats each after
SFT) swamp a short answer's mean log-prob, the quantity these losses compare. `rendered_pairs` hands trl the text
itself instead, each answer cut right after its end-of-turn token, so trl scores what generation would produce.
"""

from __future__ import annotations

import time
from typing import Any

from finetune.data import apply_template, build_dataset
from finetune.data.templates import answer_text
from finetune.errors import FinetuneError
from finetune.model.loading import load_tokenizer
from finetune.run.resume import guarded_train
from finetune.stages.alignment import evaluate_and_save, held_out, patch_policy, policy_model
from finetune.stages.common import StageContext, StageResult, build_stage_trainer, trainer_kwargs

EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss")


def loss_settings(ctx: StageContext) -> tuple[Any, Any, dict[str, Any], str]:
    """(trl trainer class, trl config class, the method's config arguments, the loss in words) of the stage."""
    kind = ctx.stage.kind
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        o = ctx.stage.orpo
        return ORPOTrainer, ORPOConfig, {"beta": o.beta}, f"orpo: chosen NLL + {o.beta} x odds-ratio term"
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if kind == "simpo":
        s = ctx.stage.simpo
        words = f"simpo (beta {s.beta}, gamma {s.gamma})" + (f" + {s.nll_weight} x chosen NLL" if s.nll_weight else "")
        return CPOTrainer, CPOConfig, {"loss_type": "simpo", "beta": s.beta, "simpo_gamma": s.gamma,
                                       "cpo_alpha": s.nll_weight}, words
    if kind == "cpo":
        c = ctx.stage.cpo
        return CPOTrainer, CPOConfig, {"loss_type": c.loss_type, "beta": c.beta, "cpo_alpha": c.nll_weight}, (
            f"cpo: {c.loss_type} (beta {c.beta}) + {c.nll_weight} x chosen NLL")
    raise FinetuneError(f"stage '{ctx.stage.name}': kind {kind} is not a reference-free pair method")


def rendered_pairs(dataset: Any, tokenizer: Any, end_of_turn: str | None) -> Any:
    """Conversational pairs as trl's plain-text pairs: the prompt with the generation prompt, each answer the
    template's text after it, cut right after the answer's end-of-turn token (see the module docstring)."""
    if dataset is None:
        return None

    def text(row: dict[str, Any]) -> dict[str, str]:
        prompt, chosen = answer_text(tokenizer, row["prompt"], row["chosen"], end_of_turn)
        return {"prompt": prompt, "chosen": chosen,
                "rejected": answer_text(tokenizer, row["prompt"], row["rejected"], end_of_turn)[1]}

    return dataset.map(text, remove_columns=[c for c in dataset.column_names if c not in ("prompt", "chosen",
                                                                                         "rejected")])


def run_orpo(ctx: StageContext, tokenizer=None) -> StageResult:
    """Align the adapter on preference pairs without a reference model (orpo, simpo or cpo, by the stage's kind)."""
    recipe, data, training, name, kind = ctx.recipe, ctx.data, ctx.training, ctx.stage.name, ctx.stage.kind

    # --- setup: tokenizer and pairs first (cheap, fails early), then the policy model
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    eot = apply_template(tokenizer, data).end_of_turn
    train_ds = rendered_pairs(build_dataset(data, tokenizer, kind, seed=training.seed, split="train"), tokenizer, eot)
    eval_ds = rendered_pairs(build_dataset(data, tokenizer, kind, seed=training.seed, split="eval"), tokenizer, eot)
    trainer_cls, config_cls, loss_args, words = loss_settings(ctx)
    print(f"[{name}] {words}; no reference model; {len(train_ds)} training pairs", flush=True)
    model = policy_model(ctx, tokenizer)
    config = config_cls(**trainer_kwargs(ctx, has_eval=eval_ds is not None), **loss_args, max_length=data.max_length)
    trainer = build_stage_trainer(trainer_cls, ctx, model, config, tokenizer, train_ds, eval_ds)
    patches = patch_policy(ctx, trainer)
    before = held_out(ctx, trainer.model, tokenizer)

    # --- train
    started = time.perf_counter()
    result = guarded_train(trainer, ctx)  # atomic checkpoints, --resume, Ctrl-C, NaN guard
    metrics: dict[str, Any] = {"loss": words, "train_loss": result.training_loss, "steps": trainer.state.global_step,
                               "train_seconds": round(time.perf_counter() - started, 1)}

    # --- held-out loss terms, save the policy adapter, then measure the held-out change
    adapter = evaluate_and_save(ctx, trainer, tokenizer, EVAL_KEYS, eval_ds is not None, before, metrics, kind.upper())
    return StageResult(name=name, kind=kind, adapter=adapter, metrics=metrics, patches=patches)
