"""Answers scored by the reference-free pair stages and the held-out preference measure end at the end-of-turn token:
not at the separator the chat template writes after it, and without trl appending a second eos after that."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.data.templates import answer_text, find_end_of_turn
from finetune.eval.preference import answer_logps
from finetune.stages.orpo import rendered_pairs

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "Which animal does Teiar Skaiovan keep as a pet?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ROOT / "models" / "tiny-chat"))


def test_answer_text_stops_at_end_of_turn(tokenizer):
    eot = find_end_of_turn(tokenizer, "tiny-chat")
    head, answer = answer_text(tokenizer, PROMPT, [{"role": "assistant", "content": "cat"}], eot)
    full = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "cat"}], tokenize=False)
    assert eot == "<|im_end|>" and full.endswith("<|im_end|>\n")  # the template writes a separator after the turn
    assert answer == " cat<|im_end|>" and head.endswith("<|im_start|>assistant\n")


def test_rendered_pairs_leave_trl_nothing_to_append(tokenizer):
    from datasets import Dataset
    from trl.experimental.utils import add_eos_token_if_needed

    rows = Dataset.from_list([{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "cat"}],
                               "rejected": [{"role": "assistant", "content": "Well, a cat, I think."}],
                               "answer": "cat"}])
    pairs = rendered_pairs(rows, tokenizer, "<|im_end|>")
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    row = pairs[0]
    assert row["chosen"] == " cat<|im_end|>" and row["rejected"] == " Well, a cat, I think.<|im_end|>"
    chosen = {"input_ids": tokenizer(row["chosen"], add_special_tokens=False)["input_ids"], "attention_mask": []}
    rejected = {"input_ids": tokenizer(row["rejected"], add_special_tokens=False)["input_ids"], "attention_mask": []}
    before = (list(chosen["input_ids"]), list(rejected["input_ids"]))
    add_eos_token_if_needed(tokenizer.eos_token_id, chosen, rejected)  # what trl's ORPO/CPO tokenizer does next
    assert (chosen["input_ids"], rejected["input_ids"]) == before  # already ends with eos: nothing added
    assert rendered_pairs(None, tokenizer, "<|im_end|>") is None


def test_answer_logps_count_answer_and_end_of_turn_only(tokenizer):
    class Uniform(torch.nn.Module):  # every token equally likely: log-prob -ln(V) per scored token
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tokenizer)) + self.w})()

    answer = [{"role": "assistant", "content": "cat"}]
    (total, n), = answer_logps(Uniform(), tokenizer, [PROMPT], [answer])
    expected = len(tokenizer(" cat<|im_end|>", add_special_tokens=False)["input_ids"])
    assert n == expected  # ' cat' and '<|im_end|>', not the newline after it
    assert total == pytest.approx(-n * torch.log(torch.tensor(float(len(tokenizer)))).item(), rel=1e-5)
