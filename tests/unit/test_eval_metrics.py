"""Each evaluation metric against values computed by hand, and the refusals of task files that cannot be scored."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.eval import metrics as M
from finetune.eval import scoring


def test_token_f1_by_hand():
    # "the red fox jumps" -> [red, fox, jumps] vs [red, fox]: 2 shared, P = 2/3, R = 1, F1 = 0.8; "blue" vs "red": 0
    assert M.token_f1(["The red fox jumps", "blue"], ["red fox", "red"]) == pytest.approx(0.4)
    # repeated words count once per occurrence: [a, a, b] vs [a, b, b] share a + b: P = R = 2/3
    assert M.token_f1(["x x y"], ["x y y"]) == pytest.approx(2 / 3)
    assert M.token_f1([""], ["the"]) == 1.0  # both empty after normalisation
    assert M.token_f1(["violin"], [""]) == 0.0


def test_exact_contains_concise_by_hand():
    preds, answers = ["The Violin.", "it is a violin, I think", "drum"], ["violin", "violin", "violin"]
    assert M.score_generated(["exact_match", "contains_answer", "concise_rate"], preds,
                             [{"answer": a} for a in answers]) == pytest.approx(
        {"exact_match": 1 / 3, "contains_answer": 2 / 3, "concise_rate": 2 / 3})
    assert M.contains_answer(["violinist"], ["violin"]) == 0.0  # whole words only


def test_regex_by_hand():
    rows = [{"answer": "7"}, {"answer": "7"}, {"answer": "1+1", "pattern": r"^2$"}]
    patterns = [M.row_pattern(r, r"^\W*{answer}\W*$") for r in rows]
    assert patterns[2] == r"^2$"
    assert M.row_pattern({"answer": "1+1"}, "{answer}") == r"1\+1"  # the answer is escaped
    assert M.regex_match(["7.", "77", "2"], patterns) == pytest.approx(2 / 3)


def test_choice_accuracy_by_hand():
    scores = [[-1.0, -2.0, -3.0], [-5.0, -1.0, -2.0], [-1.0, -1.0, 0.0]]
    assert M.choice_accuracy(scores, [0, 0, 2]) == pytest.approx(2 / 3)
    assert M.gold_index({"answer": "b", "choices": ["a", "b"]}) == 1
    assert M.gold_index({"answer": 0, "choices": ["a", "b"]}) == 0


def _fixed(logits_per_position: list[list[float]]) -> scoring.Forward:
    """A model whose logits at position t are the given row, whatever the input."""
    table = torch.tensor(logits_per_position)

    def run(ids, mask):
        return table[: ids.shape[1]].unsqueeze(0).expand(ids.shape[0], -1, -1).clone()

    return run


def test_forgetting_kl_and_loss_change_by_hand():
    # vocabulary of 2; base: p = (1/2, 1/2) everywhere; tuned: p = (3/4, 1/4)
    base, tuned = _fixed([[0.0, 0.0]] * 4), _fixed([[math.log(3), 0.0]] * 4)
    samples = [([0, 0, 1], [0, 0, 1]), ([1, 0], [1, 0])]  # next tokens: 0, 1 | 0
    got = scoring.compare(tuned, base, samples, pad_id=0)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    tuned_loss = -(2 * math.log(0.75) + math.log(0.25)) / 3
    assert got["tokens"] == 3  # the padding of the second sample does not count
    assert got["mean_kl"] == pytest.approx(kl, rel=1e-5)
    assert got["base_loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert got["loss"] == pytest.approx(tuned_loss, rel=1e-5)
    assert got["loss_change"] == pytest.approx(tuned_loss - math.log(2), rel=1e-5)


def test_mean_loss_and_perplexity_by_hand():
    tuned = _fixed([[math.log(3), 0.0]] * 4)
    scored = scoring.label_logprobs(tuned, [([0, 0, 0], [0, -100, 0])], pad_id=0)
    assert scored == [(pytest.approx(math.log(0.75)), 1)]  # one labelled next token
    figures = scoring.mean_loss([(-2.0, 2), (-1.0, 2)])
    assert figures["loss"] == pytest.approx(0.75) and figures["perplexity"] == pytest.approx(math.exp(0.75))


def test_preference_accuracy_and_margins_by_hand():
    tuned = _fixed([[math.log(3), 0.0]] * 4)  # token 0 has p 3/4, token 1 has p 1/4
    base = _fixed([[0.0, 0.0]] * 4)
    chosen = [([1, 0, 0], [-100, 0, 0]), ([0, 1], [-100, 1])]  # log p: 2 ln .75 | ln .25
    rejected = [([0, 1, 1], [-100, 1, 1]), ([0, 0], [-100, 0])]  # 2 ln .25 | ln .75
    got = scoring.preference(tuned, chosen, rejected, pad_id=0, reference=base)
    m1, m2 = 2 * math.log(0.75) - 2 * math.log(0.25), math.log(0.25) - math.log(0.75)  # 2 ln 3, -ln 3
    assert got["pairs"] == 2 and got["accuracy"] == 0.5
    assert got["margin"] == pytest.approx((m1 + m2) / 2, rel=1e-5)
    # the base scores both answers of a pair alike (p = 1/2 per token, same lengths): rewards equal the margins
    assert got["reward_margin"] == pytest.approx((m1 + m2) / 2, rel=1e-5) and got["reward_accuracy"] == 0.5


def test_task_file_refusals_name_file_rows_and_fix(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}], "answer": "a"}
    with pytest.raises(FinetuneError, match="unknown metric.*bleu"):
        M.check_task_rows("t.jsonl", [good], ["exact_match", "bleu"])
    with pytest.raises(FinetuneError, match=r"(?s)t.jsonl.*no `answer`: row\(s\) 2 \(1 of 2\)"):
        M.check_task_rows("t.jsonl", [good, {"messages": good["messages"]}], ["exact_match"])
    with pytest.raises(FinetuneError, match="no `choices`"):
        M.check_task_rows("t.jsonl", [good], ["choice_accuracy"])
    with pytest.raises(FinetuneError, match="not one of its choices"):
        M.check_task_rows("t.jsonl", [{**good, "choices": ["b", "c"]}], ["choice_accuracy"])
    with pytest.raises(FinetuneError, match="no `pattern`"):
        M.check_task_rows("t.jsonl", [good], ["regex"])
    with pytest.raises(FinetuneError, match="does not compile"):
        M.check_task_rows("t.jsonl", [good], ["regex"], pattern="(")
    M.check_task_rows("t.jsonl", [{**good, "choices": ["a", "b"]}], ["choice_accuracy", "regex"], pattern="{answer}")
