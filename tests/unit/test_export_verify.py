"""Verification: which held-out rows it uses (any data format) and the figures it computes."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.export.verify import compare_logits, verification_inputs
from finetune.recipe.schema import Recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(tokenizer, messages, prompt=False):
    return list(tokenizer.apply_chat_template(messages, return_dict=True, add_generation_prompt=prompt)["input_ids"])


def test_eval_rows_in_alpaca_format_become_conversations(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", [{"instruction": "no", "output": "no"}])
    evals = write(tmp_path / "eval.jsonl", [{"instruction": "add 1 2", "input": "", "output": "3"}] * 3)
    recipe = Recipe(data={"train": [{"path": train}], "eval": [{"path": evals}]})
    inputs, source = verification_inputs(recipe, recipe.effective_stages()[0], tokenizer, count=2)
    expected = chat(tokenizer, [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"}])
    assert inputs == [expected, expected] and source == "data.eval (eval.jsonl)"


def test_task_eval_first_and_preference_rows(tmp_path, tokenizer):
    pref = write(tmp_path / "pref.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                             "chosen": [{"role": "assistant", "content": "hello"}],
                                             "rejected": [{"role": "assistant", "content": "go"}]}])
    task = write(tmp_path / "task.jsonl", [{"messages": [{"role": "user", "content": "add 2 2"}], "answer": "4"}])
    recipe = Recipe(stages=[{"name": "dpo", "kind": "dpo", "init_from": "new", "dpo": {"reference": "base"},
                             "data": {"train": [{"path": pref}]}}])
    stage = recipe.effective_stages()[0]
    inputs, source = verification_inputs(recipe, stage, tokenizer)
    assert inputs == [chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    assert "no eval or task_eval file" in source
    stage.data.task_eval = task
    inputs, source = verification_inputs(recipe, stage, tokenizer)
    assert inputs == [chat(tokenizer, [{"role": "user", "content": "add 2 2"}, {"role": "assistant", "content": "4"}])]
    assert source == "data.task_eval (task.jsonl)"


def test_no_usable_row_says_what_to_do(tmp_path, tokenizer):
    task = write(tmp_path / "task.jsonl", [{"question": "x"}])
    recipe = Recipe(data={"train": [{"path": task}], "task_eval": task})
    with pytest.raises(FinetuneError, match="no usable row in data.task_eval.*--no-verify"):
        verification_inputs(recipe, recipe.effective_stages()[0], tokenizer)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits at each position come from a table indexed by the input token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_figures_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    inputs = [[0, 1, 2], [3, 4]]
    figures = compare_logits(FixedLogits(a), FixedLogits(b), inputs)
    kl, agree, worst = 0.0, 0, 0.0
    for token in [0, 1, 2, 3, 4]:
        p = [math.exp(x) for x in a[token].tolist()]
        q = [math.exp(x) for x in b[token].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        agree += int(a[token].argmax() == b[token].argmax())
        worst = max(worst, (a[token] - b[token]).abs().max().item())
    assert figures.mean_kl == pytest.approx(kl / 5, rel=1e-9)
    assert figures.top1_agreement == agree / 5 and figures.max_abs_logit_diff == pytest.approx(worst)
    assert (figures.tokens, figures.conversations) == (5, 2)
    same = compare_logits(FixedLogits(a), FixedLogits(a), inputs)
    assert same.mean_kl == 0 and same.max_abs_logit_diff == 0 and same.top1_agreement == 1
