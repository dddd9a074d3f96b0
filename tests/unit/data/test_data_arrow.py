"""The Arrow path (memory-mapped sources, parallel `Dataset.map`) gives exactly the list path's samples, reports and
errors, and never holds a whole source as Python rows."""

from __future__ import annotations

import json

import pytest

import finetune.data.build as build_mod
from finetune.data import apply_template, formats
from finetune.data.build import prepare
from finetune.errors import FinetuneError


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i} " + "x" * (i % 17)},
                         {"role": "assistant", "content": f"answer {i} " + "y" * (i % 29)}]}


def _both(monkeypatch, data, tok, split="train", seed=3):
    apply_template(tok, data)
    monkeypatch.setattr(build_mod, "ARROW", False)
    old = prepare(data, tok, "sft", seed, split)
    monkeypatch.setattr(build_mod, "ARROW", True)
    new = prepare(data, tok, "sft", seed, split)
    return old, new


def _columns(prepared):
    return {c: prepared.dataset[c] for c in prepared.dataset.column_names}


@pytest.mark.parametrize("kw", [
    {},
    {"shuffle": True},
    {"shuffle": True, "packing": True, "max_length": 64},
    {"shuffle": True, "eval_fraction": 0.2, "max_length": 44, "length_policy": "drop"},
    {"max_length": 48},  # truncation: cut end-of-turn tokens are counted
])
def test_same_samples_and_report_as_the_list_path(monkeypatch, tok, cfg, write, kw):
    a = write("a.jsonl", [_chat(i) for i in range(60)])
    b = write("b.jsonl", [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(25)])
    data = cfg({"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}, **kw)
    for split in ("train", "eval") if kw.get("eval_fraction") else ("train",):
        old, new = _both(monkeypatch, data, tok, split)
        assert _columns(new) == _columns(old)
        assert new.report == old.report
        assert new.report.tokens > 0


def test_text_corpus_packed_like_the_list_path(monkeypatch, tok, cfg, write):
    path = write("corpus.jsonl", [{"text": "word " * (3 + i % 40)} for i in range(80)])
    old, new = _both(monkeypatch, cfg(path, packing=True, max_length=96, shuffle=True), tok)
    assert _columns(new) == _columns(old)
    assert "seq_lengths" in new.dataset.column_names and new.report.rows < new.report.samples


def test_bad_rows_named_by_line_as_the_list_path(monkeypatch, tok, cfg, write):
    rows = [_chat(i) for i in range(6)]
    rows[2] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    path = write("bad.jsonl", [*rows[:4], "", *rows[4:]])  # a blank line: line numbers are not row numbers
    data = cfg(path)
    errors = []
    for arrow in (False, True):
        monkeypatch.setattr(build_mod, "ARROW", arrow)
        apply_template(tok, data)
        with pytest.raises(FinetuneError) as e:
            prepare(data, tok, "sft", 0, "train")
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "line 3" in errors[1] and "empty assistant turn" in errors[1]


def test_untrainable_rows_named_as_the_list_path(monkeypatch, tok, cfg, write):
    rows = [_chat(i) for i in range(5)] + [{"messages": [{"role": "user", "content": "only a question"}]}]
    path = write("q.jsonl", ["", *rows])
    errors = []
    for arrow in (False, True):
        monkeypatch.setattr(build_mod, "ARROW", arrow)
        data = cfg(path)
        apply_template(tok, data)
        with pytest.raises(FinetuneError) as e:
            prepare(data, tok, "sft", 0, "train")
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "line 7" in errors[1]


def test_no_step_holds_the_whole_source(monkeypatch, tok, cfg, write):
    """3,000 rows: the list reader is never called, and normalisation only ever sees one map batch of rows."""
    path = write("big.jsonl", [_chat(i) for i in range(3000)])
    seen: list[int] = []
    normalize = formats.normalize_sft

    def counting(table, fmt):
        seen.append(len(table.rows))
        return normalize(table, fmt)

    def no_list_reader(*args, **kwargs):
        raise AssertionError("the Arrow path must not read the source into a list")

    monkeypatch.setattr(formats, "normalize_sft", counting)
    monkeypatch.setattr(build_mod, "read_source", no_list_reader)
    data = cfg(path, packing=True, max_length=128, num_proc=1)
    apply_template(tok, data)
    prepared = prepare(data, tok, "sft", 0, "train")
    assert prepared.report.samples == 3000
    assert sum(seen) == 3000 and max(seen) <= 500
    assert prepared.dataset.cache_files  # memory-mapped from Arrow files, not an in-memory table


def test_two_processes_give_the_same_samples(monkeypatch, tok, cfg, write):
    path = write("two.jsonl", [_chat(i) for i in range(4400)])
    data = cfg(path, shuffle=True, num_proc=2)
    apply_template(tok, data)
    two = prepare(data, tok, "sft", 0, "train")
    one = prepare(cfg(path, shuffle=True, num_proc=1, max_length=1024), tok, "sft", 0, "train")
    assert two.dataset["input_ids"] == one.dataset["input_ids"]


def test_mixed_types_fall_back_to_the_list_reader(monkeypatch, tok, cfg, tmp_path):
    """Content as a string in one row and as text parts in another: Arrow cannot type the column; the list path
    reads it as before."""
    rows = [_chat(0), {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                    {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = cfg(path)
    apply_template(tok, data)
    prepared = prepare(data, tok, "sft", 0, "train")
    assert prepared.report.samples == 2
