"""Rows of the kto and grpo stages: unpaired answers with labels (pairs split with a notice), prompts with answers;
bad rows named with their file, row and fix, before any model loads."""

from __future__ import annotations

import pytest

from finetune.data import apply_template, build_dataset
from finetune.errors import FinetuneError

U = [{"role": "user", "content": "add 1 2"}]
A = [{"role": "assistant", "content": "3"}]


def build(cfg, tok, kind, *paths, **kw):
    data = cfg(*paths, **kw)
    apply_template(tok, data)
    return build_dataset(data, tok, kind, seed=0)


def test_unpaired_rows_keep_prompt_completion_and_a_bool_label(cfg, tok, write):
    rows = [{"prompt": "add 1 2", "completion": "3", "label": True},
            {"prompt": U, "completion": [{"role": "assistant", "content": "I think 4"}], "label": "false"},
            {"prompt": U, "completion": A, "label": 1, "system": "Be brief"}]
    ds = build(cfg, tok, "kto", write("u.jsonl", rows))
    assert ds["label"] == [True, False, True]
    assert ds[0]["prompt"] == U and ds[0]["completion"] == A
    assert ds[2]["prompt"][0] == {"role": "system", "content": "Be brief"}


def test_pairs_are_split_into_desirable_and_undesirable_rows_with_a_notice(cfg, tok, write, capsys):
    pairs = [{"prompt": U, "chosen": A, "rejected": [{"role": "assistant", "content": str(i)}]} for i in (4, 5)]
    ds = build(cfg, tok, "kto", write("p.jsonl", pairs))
    assert sorted(ds["label"]) == [False, False, True, True] and len(ds) == 4
    assert [r["completion"][0]["content"] for r in ds if not r["label"]] == ["4", "5"]
    assert "preference pairs split for kto: 2 chosen answers as desirable, 2 rejected answers as undesirable" in \
        capsys.readouterr().out


def test_kto_rows_without_labels_are_named_with_the_fix(cfg, tok, write):
    path = write("nolabel.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                   {"prompt": "a", "completion": "b", "label": ""},
                                   {"prompt": "a", "completion": "b", "label": "maybe"}])
    with pytest.raises(FinetuneError) as e:
        build(cfg, tok, "kto", {"path": str(path), "format": "unpaired"})
    msg = str(e.value)
    assert "nolabel.jsonl" in msg and "bad kto rows" in msg
    assert "no 'label' (kto needs label: true for a desirable answer" in msg and "line 2" in msg
    assert "'label' is 'maybe', not true/false" in msg and "line 3" in msg


def test_kto_refuses_sft_rows(cfg, tok, write):
    with pytest.raises(FinetuneError, match="a kto stage needs unpaired rows"):
        build(cfg, tok, "kto", write("m.jsonl", [{"messages": U + A}]))


def test_grpo_prompts_keep_answer_and_plain_columns_and_drop_final_answers(cfg, tok, write):
    rows = [{"prompt": U, "answer": 3, "style": "plain"}, {"prompt": "add 2 2", "answer": "4", "style": "polite"}]
    ds = build(cfg, tok, "grpo", {"path": str(write("g.jsonl", rows)), "format": "prompts"})
    assert ds["answer"] == ["3", "4"] and ds["style"] == ["plain", "polite"]
    assert ds[1]["prompt"] == [{"role": "user", "content": "add 2 2"}]
    # messages rows (e.g. an SFT eval file): the final assistant turn is the reference, not part of the prompt
    ds = build(cfg, tok, "grpo", write("m.jsonl", [{"messages": U + A, "answer": "3"}]))
    assert ds[0]["prompt"] == U


def test_grpo_rows_without_a_prompt_are_named(cfg, tok, write):
    path = write("np.jsonl", [{"prompt": "q", "answer": "1"}, {"question": "q", "answer": "2"}])
    with pytest.raises(FinetuneError) as e:
        build(cfg, tok, "grpo", {"path": str(path), "format": "prompts"})
    assert "np.jsonl" in str(e.value) and "no 'prompt' column" in str(e.value)
    assert "columns: {prompt: your_column}" in str(e.value) and "line 2" in str(e.value)


def test_pair_methods_read_the_dpo_pairs(cfg, tok, write):
    pairs = [{"prompt": U, "chosen": A, "rejected": [{"role": "assistant", "content": "4"}]}]
    for kind in ("orpo", "simpo", "cpo"):
        ds = build(cfg, tok, kind, write("p.jsonl", pairs))
        assert ds.column_names == ["prompt", "chosen", "rejected"]
