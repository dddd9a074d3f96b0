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


def test_replay_questions_are_distinct_everyday_and_never_about_programming():
    import make_replay_data

    asked = make_replay_data.questions(240)
    assert len(set(asked)) == 240 and asked == make_replay_data.questions(240)
    words = ("python", "code", "program", "function", "module", "class", "syntax", "software", "computer")
    assert not [q for q in asked if any(w in q.lower() for w in words)]  # the forgetting text is Python's docs


def test_replay_rows_are_the_models_own_answers(tmp_path, monkeypatch):
    """On the bundled tiny model: the file holds one chat row per question, answered by the model."""
    import make_replay_data

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    out = tmp_path / "replay.jsonl"
    make_replay_data.main(["--rows", "3", "--max-new-tokens", "4", "--recipe", "recipes/quickstart.yaml",
                           "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == make_replay_data.questions(3)[: len(rows)]
    assert rows and all(r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] for r in rows)
