"""Task evaluation: greedy answers to chat prompts, exact match and conciseness.

The quickstart task asks short factual questions (`data/quickstart/sft_eval.jsonl` and `dpo_eval.jsonl`).
A prediction is scored after :func:`normalize_answer`:

* `exact_match`: the normalised prediction equals the normalised answer, i.e. a concise *and* correct answer;
* `contains_answer`: the normalised answer appears, as whole words, inside the normalised prediction (right
  but possibly wrapped in hedging);
* `concise_rate`: the prediction is non-empty and at most :data:`CONCISE_MAX_WORDS` words long once
  normalised (right or wrong).

These work the same for a plain model, a bitsandbytes 4-bit model and a peft model.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where answers are generated: the metrics and `ft validate` need none of it
    import torch

CONCISE_MAX_WORDS = 3
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Normalises a short answer for comparison (SQuAD style).

    Lower-cases, turns punctuation into spaces, drops the articles "a", "an" and "the", and collapses
    whitespace. For example `"  The Violin."` becomes `"violin"`.

    Args:
        text: A predicted or reference answer.

    Returns:
        The normalised text.
    """
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`normalize_answer`.

    Args:
        predictions: Model outputs.
        answers: Reference answers, one per prediction.

    Returns:
        The exact-match rate in [0, 1] (0.0 for empty input).

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True))
    return hits / len(predictions)


def _contains(prediction: str, answer: str) -> bool:
    return f" {normalize_answer(answer)} " in f" {normalize_answer(prediction)} "


def _is_concise(prediction: str) -> bool:
    return 0 < len(normalize_answer(prediction).split()) <= CONCISE_MAX_WORDS


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedily answers chat prompts.

    Each prompt (a list of `{"role", "content"}` messages ending with a user turn) is rendered with the
    tokenizer's chat template and its generation prompt, and batches are left-padded. The tokenizer's padding
    side and the model's train/eval mode are restored afterwards.

    Args:
        model: A causal LM (plain, 4-bit quantised or wrapped by peft).
        tokenizer: Its tokenizer, with a chat template and a pad token.
        prompts: The conversations to answer.
        max_new_tokens: Generation budget per answer.
        batch_size: Prompts per `generate` call.
        progress: Called with (answers done, total) after each batch.

    Returns:
        The decoded answers (special tokens dropped, surrounding whitespace stripped), in prompt order.
    """
    import torch

    with torch.no_grad():
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)


def _generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
              progress: Callable[[int, int], None] | None) -> list[str]:
    from finetune.data.templates import stop_ids

    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    try:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(_device(model))
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stop_ids(tokenizer),
                # MoE during training (trl turns the router loss on): its load-balancing loss cannot take the cache's
                # shorter steps with a padded mask, and generation needs none
                **({"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}),
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(answers), len(texts))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def _prompt_of(row: dict) -> list[dict]:
    """The conversation to answer: `prompt` (DPO rows) or `messages` without its final assistant turn."""
    if "prompt" in row:
        return row["prompt"]
    messages = row["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def task_metrics(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    return_predictions: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Scores greedy answers on rows of the `sft_eval`/`dpo_eval` format.

    Args:
        model: A causal LM (plain, 4-bit quantised or wrapped by peft).
        tokenizer: Its tokenizer.
        rows: Dicts with `answer` and either `messages` (a final assistant turn, if any, is dropped) or
            `prompt`.
        max_new_tokens: Generation budget per answer.
        batch_size: Prompts per `generate` call.
        return_predictions: Also return the raw predictions under `"predictions"`.
        progress: Called with (answers done, total) after each generation batch.

    Returns:
        `{"exact_match", "contains_answer", "concise_rate", "n"}` (rates in [0, 1]; see the module
        docstring), plus `"predictions"` if asked.
    """
    predictions = generate_answers(model, tokenizer, [_prompt_of(r) for r in rows], max_new_tokens, batch_size,
                                   progress)
    answers = [r["answer"] for r in rows]
    n = len(rows)
    metrics: dict = {
        "exact_match": exact_match(predictions, answers),
        "contains_answer": sum(_contains(p, a) for p, a in zip(predictions, answers, strict=True)) / n if n else 0.0,
        "concise_rate": sum(_is_concise(p) for p in predictions) / n if n else 0.0,
        "n": n,
    }
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics
