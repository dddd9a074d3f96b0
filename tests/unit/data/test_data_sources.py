"""Sources (jsonl, json, parquet, csv, folders, save_to_disk, Hub), splitting, mixing, lengths, and bad input that
must fail with the file, the rows and the fix."""

from __future__ import annotations

import csv
import json

import pytest

from finetune.data import apply_template, build_dataset, read_rows
from finetune.data.build import prepare
from finetune.errors import FinetuneError
from finetune.recipe.schema import DatasetSource

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]


def build(tok, data, kind="sft", split="train", seed=0):
    apply_template(tok, data)
    return build_dataset(data, tok, kind, seed=seed, split=split)


def test_every_file_kind_reads_the_same_rows(tmp_path, write):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    paths = {"jsonl": write("a.jsonl", ROWS)}
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    paths["json"] = tmp_path / "a.json"
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    paths["json {data: [...]}"] = tmp_path / "wrapped.json"
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["JSON Lines named .json"] = tmp_path / "lines.json"
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    paths["parquet"] = tmp_path / "a.parquet"
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(ROWS)
    paths["csv"] = tmp_path / "a.csv"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (folder / "2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    paths["folder"] = folder
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    paths["save_to_disk"] = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "saved_dict"))
    for kind, path in paths.items():
        assert read_rows(DatasetSource(path=str(path))) == ROWS, kind
    assert read_rows(DatasetSource(path=str(tmp_path / "saved_dict"), split="test")) == ROWS
    with pytest.raises(FinetuneError, match="has no split 'validation' \\(splits: train, test\\)"):
        read_rows(DatasetSource(path=str(tmp_path / "saved_dict"), split="validation"))


def test_hub_dataset_offline_names_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError, match="Hub dataset 'someone/not-cached' cannot be loaded.*HF_HUB_OFFLINE"):
        read_rows(DatasetSource(path="someone/not-cached"), "data.train[0]")


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n{"text": oops}\n', r"bad.jsonl line 2 is not valid JSON"),
        (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"bad.jsonl line 2 is not valid UTF-8"),
        (b"\n\n", r"'.*bad.jsonl' holds no rows"),
        (b'["not", "an", "object"]\n', r"bad.jsonl line 1 is a list, not an object"),
    ],
)
def test_unreadable_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(FinetuneError, match=message):
        read_rows(DatasetSource(path=str(tmp_path / "bad.jsonl")))


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(FinetuneError, match=r"cannot read .*bad.parquet as parquet"):
        read_rows(DatasetSource(path=str(tmp_path / "bad.parquet")))


def test_unsupported_extension_and_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FinetuneError, match="unsupported extension '.txt'"):
        read_rows(DatasetSource(path=str(tmp_path / "x.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="holds no .jsonl"):
        read_rows(DatasetSource(path=str(tmp_path / "empty")))


def test_missing_columns_name_rows_fields_and_fitting_format(tok, cfg, write):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}, {"prompt": "p", "completion": "c"}]
    data = cfg({"path": str(write("m.jsonl", rows)), "format": "alpaca"})
    with pytest.raises(FinetuneError) as err:
        build(tok, data)
    text = str(err.value)
    assert "m.jsonl" in text and "1 row: missing 'output'" in text and "line 2" in text
    assert "alpaca rows have instruction, output" in text  # the fields expected
    assert "these columns fit format 'prompt_completion'" in text and "line 3" in text  # the format that fits


def test_undetectable_format_lists_the_known_ones(tok, cfg, write):
    with pytest.raises(FinetuneError, match=r"cannot tell the format from the columns foo.*alpaca rows have"):
        build(tok, cfg(write("u.jsonl", [{"foo": 1}])))


def test_empty_assistant_turns_are_counted_and_named(tok, cfg, write):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    with pytest.raises(FinetuneError, match=r"e.jsonl':\n  2 rows: empty assistant turn.*\(line 2; line 4\)"):
        build(tok, cfg(write("e.jsonl", [good, empty, good, empty])))


def test_rows_without_an_answer_are_refused_by_line(tok, cfg, write):
    """`ft train`, `--dry-run` and `ft data preview` agree: such rows are refused, named, not silently dropped."""
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(FinetuneError, match=r"f.jsonl': rows with nothing to train on\n  1 row: no assistant turn.*"
                                            r"\(line 2\)"):
        build(tok, cfg(write("f.jsonl", [good, no_answer, good])))


def test_samples_masked_by_truncation_are_dropped_and_counted_and_fail_when_all(tok, cfg, write, capsys):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long_prompt = {"messages": [{"role": "user", "content": "q" * 60}, {"role": "assistant", "content": "a"}]}
    ds = build(tok, cfg(write("f.jsonl", [good, long_prompt, good]), max_length=40))
    assert len(ds) == 2 and "1 dropped as fully masked" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match="all 2 samples were dropped.*2 with no trained token"):
        build(tok, cfg(write("g.jsonl", [long_prompt, long_prompt]), max_length=40))


def test_length_policy_truncate_and_drop_are_reported(tok, cfg, write, capsys):
    short = {"text": "ab"}
    long = {"text": "x" * 30}
    ds = build(tok, cfg(write("l.jsonl", [short, long]), max_length=10))
    assert [len(r) for r in ds["input_ids"]] == [3, 10]
    assert "1 truncated, 0 dropped as too long" in capsys.readouterr().out
    ds = build(tok, cfg(write("l.jsonl", [short, long]), max_length=10, length_policy="drop"))
    assert len(ds) == 1 and "0 truncated, 1 dropped as too long" in capsys.readouterr().out


def test_eval_fraction_is_disjoint_from_train_and_deterministic(tok, cfg, write):
    rows = [{"text": f"row {i:02d}"} for i in range(20)]
    data = cfg(write("t.jsonl", rows), eval_fraction=0.25, shuffle=True)
    train, val = build(tok, data, seed=3), build(tok, data, split="eval", seed=3)
    as_text = lambda ds: {tok.decode(r, skip_special_tokens=True) for r in ds["input_ids"]}  # noqa: E731
    assert len(train) == 15 and len(val) == 5
    assert as_text(train) | as_text(val) == {r["text"] for r in rows} and not as_text(train) & as_text(val)
    assert build(tok, data, seed=3)["input_ids"] == train["input_ids"]  # same seed, same order
    assert build(tok, data, seed=4)["input_ids"] != train["input_ids"]  # the seed drives the shuffle


def test_mixing_by_weight_and_by_sample_count(tok, cfg, write):
    a = write("a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write("b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    data = cfg({"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}, shuffle=True)
    apply_template(tok, data)
    prepared = prepare(data, tok, "sft", 0, "train")
    texts = [tok.decode(r, skip_special_tokens=True) for r in prepared.dataset["input_ids"]]
    # 14 rows in all, shared 1:3 -> 4 from a (subsampled), 10 from b (its 4 rows repeated)
    assert sum(t.startswith("a") for t in texts) == 4 and sum(t.startswith("b") for t in texts) == 10
    assert {t for t in texts if t.startswith("b")} == {f"b{i}" for i in range(4)}
    capped = prepare(cfg({"path": str(a), "max_samples": 3}, {"path": str(b), "max_samples": 2}), tok, "sft", 0,
                     "train")
    assert [s["used"] for s in capped.report.sources] == [3, 2] and len(capped.dataset) == 5


def test_dpo_rows_of_every_shape_become_conversational_triples(tok, cfg, write):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],  # implicit prompt
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},
    ]
    ds = build(tok, cfg(write("p.jsonl", rows)), kind="dpo")
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    expected = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}
    assert list(ds) == [expected] * 4


def test_bad_preference_rows_are_counted_and_named(tok, cfg, write):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"},
            {"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q", "chosen": "", "rejected": "b"},
            {"prompt": "Q", "chosen": "x", "rejected": "x"}]
    with pytest.raises(FinetuneError) as err:
        build(tok, cfg(write("pref.jsonl", rows)), kind="dpo")
    text = str(err.value)
    assert "pref.jsonl" in text
    assert "1 row: missing 'rejected'" in text and "(line 2)" in text
    assert "1 row: missing 'chosen'" in text and "(line 4)" in text
    assert "2 rows: chosen answer identical to the rejected one" in text and "(line 3; line 5)" in text


def test_sft_data_in_a_dpo_stage_and_back_are_refused(tok, cfg, write):
    with pytest.raises(FinetuneError, match="a dpo stage needs preference rows"):
        build(tok, cfg(write("s.jsonl", ROWS)), kind="dpo")
    with pytest.raises(FinetuneError, match="preference rows .* belong to a dpo stage"):
        build(tok, cfg(write("p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])))
