"""`scripts/make_real_data.py`: the committed real-model data is what the script makes, and the extra SFT rows
(`sft_train_more.jsonl`) never ask a held-out question nor change the other files."""

from __future__ import annotations

import json
from pathlib import Path

import make_real_data

DATA = Path(__file__).resolve().parents[2] / "data" / "smollm2"


def test_more_rows_leave_the_first_rows_as_they_were():
    train0, held0 = make_real_data.make_questions(more=0)
    train, held = make_real_data.make_questions(more=300)
    assert held == held0
    assert train[: len(train0)] == train0
    assert len(train) == len(train0) + 300


def test_more_rows_are_new_operand_pairs_never_held_out():
    train, held = make_real_data.make_questions(more=500)
    key = [(r["a"], r["op"], r["b"]) for r in train]
    assert len(set(key)) == len(key)
    assert not set(key) & {(r["a"], r["op"], r["b"]) for r in held}


def test_committed_files_are_the_scripts_output():
    files = make_real_data.make_files()
    assert len(files["sft_train_more.jsonl"]) == make_real_data.N_MORE
    for name, rows in files.items():
        committed = (DATA / name).read_text(encoding="utf-8")
        assert committed == "".join(json.dumps(r) + "\n" for r in rows), f"run scripts/make_real_data.py ({name})"
