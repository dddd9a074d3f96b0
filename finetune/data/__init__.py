"""Data: read rows, turn them into conversations, tokenize with the chat template and label masks.

The public entry point is `build_dataset`; stages never look at raw rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe import DataConfig, DatasetSource

IGNORE = -100


def read_rows(src: DatasetSource) -> list[dict[str, Any]]:
    """Rows of a local .jsonl file. (Other sources come with the data module proper.)"""
    path = Path(src.path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"{path}: row {n} is not valid JSON ({e.msg})") from None
    if src.max_samples:
        rows = rows[: src.max_samples]
    return rows


def tokenize_messages(tokenizer, messages: list[dict[str, str]], train_on: str, max_length: int) -> dict[str, list]:
    """Token ids and labels of one conversation.

    Labels cover each assistant turn and its end-of-turn token (found by rendering the conversation up to the turn
    with and without it); everything else is -100 unless `train_on` is `all`.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
        if msg["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(
                messages[:i], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            if upto[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
                raise FinetuneError("the chat template does not render conversations prefix by prefix")
            labels += [IGNORE] * (len(prompt) - len(ids)) + upto[len(prompt) :]
        else:
            if upto[: len(ids)] != ids:
                raise FinetuneError("the chat template does not render conversations prefix by prefix")
            new = upto[len(ids) :]
            labels += list(new) if train_on == "all" else [IGNORE] * len(new)
        ids = list(upto)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(data: DataConfig, tokenizer, kind: str, seed: int, split: str = "train"):
    """A tokenized `datasets.Dataset` (input_ids, labels) for a stage, or None when the split has no data."""
    from datasets import Dataset

    sources = data.train if split == "train" else data.eval
    if not sources:
        return None
    rows = [r for src in sources for r in read_rows(src)]
    if kind != "sft":
        raise FinetuneError(f"{kind} data is not supported yet")
    out = [tokenize_messages(tokenizer, r["messages"], data.train_on, data.max_length) for r in rows]
    ds = Dataset.from_list(out)
    return ds.shuffle(seed=seed) if data.shuffle and split == "train" else ds
