"""Held-out preference accuracy: does the model score the chosen answer of a pair above the rejected one?

One measure for every alignment method, with or without a reference model: the policy's own log-probability of each
answer given the prompt (rendered with the chat template, answer tokens only, up to and including the end-of-turn
token: not the separator the template writes after it, which no label trains and sampling never produces; in a
two-token answer that untrained newline alone decided the mean). Two scores:

* `preference_accuracy`: the chosen answer's mean log-prob per token beats the rejected one's (length-normalised,
  so a long rejected answer is not favoured or penalised for its length alone);
* `preference_accuracy_total`: the same with summed log-probs (what sampling follows: the likelier whole answer).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.data.templates import answer_text, find_end_of_turn


def answer_logps(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict]], answers: list[list[dict]],
                 batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each answer after its prompt.

    Args:
        model: A causal LM (plain, 4-bit or peft).
        tokenizer: Its tokenizer, with the chat template.
        prompts: Conversations ending with a user turn.
        answers: The assistant messages that follow each prompt.
        batch_size: Sequences per forward.

    Returns:
        One (sum of log-probs, number of answer tokens) per answer.
    """
    from finetune.eval import scoring

    samples = []
    end_of_turn = find_end_of_turn(tokenizer, "the chat template") or tokenizer.eos_token
    for prompt, answer in zip(prompts, answers, strict=True):
        head_text, answer_part = answer_text(tokenizer, prompt, answer, end_of_turn)
        head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(head_text + answer_part, add_special_tokens=False)["input_ids"]
        samples.append((full, [scoring.IGNORE] * len(head) + full[len(head):]))  # the answer's tokens carry labels
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return scoring.label_logprobs(scoring.forward(model), samples, pad, batch_size)


def preference_accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict], batch_size: int = 16
                        ) -> dict[str, float]:
    """Share of held-out pairs whose chosen answer the model scores above the rejected one (see the module docstring).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer, with the chat template.
        rows: Pairs `{"prompt": [...], "chosen": [...], "rejected": [...]}` (messages; the quickstart's dpo_eval rows).
        batch_size: Sequences per forward.

    Returns:
        `{"preference_accuracy", "preference_accuracy_total", "pairs"}`.
    """
    prompts = [r["prompt"] for r in rows]
    chosen = answer_logps(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size)
    rejected = answer_logps(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size)
    n = max(len(rows), 1)
    mean_wins = sum(c / max(nc, 1) > r / max(nr, 1) for (c, nc), (r, nr) in zip(chosen, rejected, strict=True))
    total_wins = sum(c > r for (c, _), (r, _) in zip(chosen, rejected, strict=True))
    return {"preference_accuracy": mean_wins / n, "preference_accuracy_total": total_wins / n, "pairs": len(rows)}
