"""Does an export behave like the model that was trained? Compare next-token logits on held-out conversations.

The reference is the trained model exactly as training saw it (the base loaded as the recipe says, 4-bit for QLoRA,
with the adapter on top). The candidate is the export, loaded back from disk. Three figures come out:

- max |logit difference| over every position and vocabulary entry (scale depends on the model: read it relatively),
- mean KL(trained || export) per token in nats (scale-free: this is the figure the export threshold applies to),
- top-1 agreement: share of positions where both models pick the same next token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.recipe.schema import DatasetSource, Recipe, StageConfig

DEFAULT_MAX_KL = 1e-2
"""Default ceiling on the mean KL per token (nats). On the test model a faithful merge into the dequantized base
scores 0 in fp32 and under 1e-6 in bf16; on large models bf16 rounding of the merged weights costs more (expected
around 1e-4 to 1e-3), hence the margin. Compare with the adapter's own effect (`adapter_effect`), which verification
reports next to it: a merge that lost or mis-scaled the adapter lands near that figure."""


@dataclass
class Figures:
    """How closely a candidate model reproduces the reference on the verification conversations."""

    max_abs_logit_diff: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    conversations: int
    # top-1 agreement where the reference's best token leads its second by more than twice that position's largest
    # logit difference: a flip between near-tied tokens (a real 49k-token model has many) is rounding, not an error
    top1_agreement_decisive: float = 1.0
    near_ties: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON files and model cards."""
        return asdict(self)

    def line(self) -> str:
        """One human line, e.g. for the console."""
        return (
            f"max |logit diff| {self.max_abs_logit_diff:.3g}, mean KL {self.mean_kl:.3g} nats/token, "
            f"top-1 agreement {self.top1_agreement:.2%} ({self.top1_agreement_decisive:.2%} without the "
            f"{self.near_ties} near ties; {self.tokens} tokens, {self.conversations} conversations)"
        )


def _conversation(row: dict[str, Any]) -> list[dict[str, str]] | str | None:
    """What to run through the models for one normalised row: a conversation, a plain text, or None."""
    if isinstance(row.get("messages"), list):
        messages = list(row["messages"])
        if messages and messages[-1].get("role") != "assistant" and isinstance(row.get("answer"), str):
            messages.append({"role": "assistant", "content": row["answer"]})  # task_eval rows: question + answer
        return messages or None
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if isinstance(prompt, list) and isinstance(chosen, list):  # preference rows: the prompt and the chosen answer
        return prompt + chosen
    return row["text"] if isinstance(row.get("text"), str) else None


def _normalised(src: DatasetSource, key: str) -> list[dict[str, Any]]:
    """Rows of one source in any supported format, as the data module normalises them for training."""
    from finetune.data import formats
    from finetune.data.readers import read_source

    table = read_source(src, key)
    formats.apply_columns(table, src.columns)
    fmt, _ = formats.resolve_format(table, src.format)
    rows = formats.normalize_preference(table) if fmt == "preference" else formats.normalize_sft(table, fmt)
    return rows[: src.max_samples] if src.max_samples else rows


def _rows(recipe: Recipe, stage: StageConfig) -> tuple[list[dict[str, Any]], str]:
    """Held-out rows for verification and a short description of where they came from (no absolute paths)."""
    from finetune.stages.common import load_task_rows

    data = recipe.stage_data(stage)
    if data.task_eval:
        # verification runs the rows as conversations and needs no answers: rows are taken as they are
        rows = load_task_rows(data.task_eval, data.task_eval_max_rows, check=False)
        return rows, f"data.task_eval ({Path(data.task_eval).name})"
    if data.eval:
        rows = [r for i, src in enumerate(data.eval) for r in _normalised(src, f"data.eval[{i}]")]
        return rows, "data.eval (" + ", ".join(Path(s.path).name for s in data.eval) + ")"
    # No eval file: training rows still show whether the export computes what the trained model computes.
    rows = [r for i, src in enumerate(data.train) for r in _normalised(src, f"data.train[{i}]")]
    return rows, "data.train (the recipe has no eval or task_eval file)"


def verification_inputs(
    recipe: Recipe, stage: StageConfig, tokenizer, count: int = 16, max_tokens: int = 256
) -> tuple[list[list[int]], str]:
    """Token ids of up to `count` conversations of the stage's held-out data, rendered with the chat template.

    Returns:
        The token id lists and a description of their source for reports and model cards.
    """
    conversations, source = verification_conversations(recipe, stage, count)
    inputs: list[list[int]] = []
    for messages in conversations:
        if isinstance(messages, str):  # text rows are trained without a chat template
            ids = tokenizer(messages)["input_ids"]
        elif not tokenizer.chat_template:  # a text run (no template) checked on task rows: their text, plainly
            ids = tokenizer("\n".join(str(m["content"]) for m in messages))["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=messages[-1]["role"] != "assistant"
            )["input_ids"]
        inputs.append(list(ids)[:max_tokens])
    return inputs, source


def verification_conversations(recipe: Recipe, stage: StageConfig, count: int = 16
                               ) -> tuple[list[list[dict[str, str]] | str], str]:
    """Up to `count` conversations (or plain texts) of the stage's held-out data, and where they came from."""
    rows, source = _rows(recipe, stage)
    found = [c for c in map(_conversation, rows) if c is not None][:count]
    if not found:
        raise FinetuneError(
            f"verification: no usable row in {source} (need messages, prompt + chosen, or text rows). "
            "Add data.task_eval or data.eval rows in that format, or skip verification with --no-verify."
        )
    return found, source


def compare_logits(reference, candidate, inputs: list[list[int]]) -> Figures:
    """Figures of `candidate` against `reference` on each conversation (one at a time: no padding to get wrong)."""
    return compare_forwards(_forward(reference), _forward(candidate), inputs)


def adapter_effect(trained, inputs: list[list[int]]) -> Figures:
    """How far the adapter moves the base: the trained peft model against itself with the adapter switched off.

    Gives the verification figures a scale: a merge error is small only relative to what the adapter changes.
    """

    def without_adapter(x: torch.Tensor) -> torch.Tensor:
        with trained.disable_adapter():
            return trained(input_ids=x).logits

    return compare_forwards(_forward(trained), without_adapter, inputs, device=next(trained.parameters()).device)


def _forward(model):
    device = next(model.parameters()).device
    return lambda x: model(input_ids=x.to(device)).logits


@torch.no_grad()
def compare_forwards(reference, candidate, inputs: list[list[int]], device: torch.device | None = None) -> Figures:
    """Figures of two forward functions (token ids `[1, T]` -> logits `[1, T, V]`) on each input in turn."""
    max_abs, kl_sum, agree, tokens, decisive, agree_decisive = 0.0, 0.0, 0, 0, 0, 0
    for ids in inputs:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        ref = reference(x)[0].float().cpu()
        cand = candidate(x)[0].float().cpu()
        max_abs = max(max_abs, (ref - cand).abs().max().item())
        # float64 for the KL: in float32 the rounding of log-softmax alone shows up as a KL around 1e-8.
        log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
        kl_sum += torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        same = ref.argmax(-1) == cand.argmax(-1)
        agree += same.sum().item()
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (ref - cand).abs().amax(-1)
        decisive += clear.sum().item()
        agree_decisive += (same & clear).sum().item()
        tokens += len(ids)
    return Figures(
        max_abs_logit_diff=max_abs,
        mean_kl=max(kl_sum / tokens, 0.0),  # tiny negative values are float noise
        top1_agreement=agree / tokens,
        tokens=tokens,
        conversations=len(inputs),
        top1_agreement_decisive=agree_decisive / decisive if decisive else 1.0,
        near_ties=tokens - decisive,
    )
