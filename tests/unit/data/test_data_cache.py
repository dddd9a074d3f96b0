"""The preprocessing cache is hit by a later run with the same inputs and missed when any input changes."""

from __future__ import annotations

import pytest

import finetune.data.build as build_mod
from finetune.data import apply_template
from finetune.data.build import prepare

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(8)]


@pytest.fixture
def setup(tok, cfg, write, tmp_path):
    path = write("c.jsonl", ROWS)
    data = cfg(path, cache_dir=str(tmp_path / "cache"))
    apply_template(tok, data)
    return tok, data, path


def test_second_run_hits_and_does_not_read_the_data(setup, monkeypatch, tiny_model):
    tok, data, _ = setup
    first = prepare(data, tok, "sft", 0, "train")
    assert first.report.cache.startswith("miss, saved to")

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the data files")

    monkeypatch.setattr(build_mod, "read_source", no_reading)
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(str(tiny_model))  # a later run: a new tokenizer object, same files
    apply_template(fresh, data)
    second = prepare(data, fresh, "sft", 0, "train")
    assert second.report.cache.startswith("hit")
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    assert second.dataset["labels"] == first.dataset["labels"]
    assert second.report.trained_tokens == first.report.trained_tokens > 0


def test_template_change_misses(setup):
    tok, data, _ = setup
    prepare(data, tok, "sft", 0, "train")
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|>:")
    changed = prepare(data, tok, "sft", 0, "train")
    assert changed.report.cache.startswith("miss")
    assert tok.convert_tokens_to_ids(":") in changed.dataset["input_ids"][0]
    again = prepare(data, tok, "sft", 0, "train")
    assert again.report.cache.startswith("hit")


@pytest.mark.parametrize("change", ["file", "data_section", "seed", "kind_split"])
def test_other_inputs_miss(setup, change):
    tok, data, path = setup
    prepare(data, tok, "sft", 0, "train")
    seed, split = 0, "train"
    if change == "file":
        path.write_text(path.read_text().replace("a7", "b7"))
    elif change == "data_section":
        data = data.model_copy(update={"max_length": 100})
    elif change == "seed":
        seed = 1
    else:
        data = data.model_copy(update={"eval_fraction": 0.25})
        split = "eval"
    assert prepare(data, tok, "sft", seed, split).report.cache.startswith("miss")


def test_checks_before_training_skip_a_file_that_passed_them_unchanged(write, tmp_path, monkeypatch, capsys):
    """A warm start on a large corpus must not parse every row in Python again: a file that passed the checks is
    recorded by its content hash; unchanged it is not read, changed it is read and its new problem reported."""
    import finetune.data.readers as readers_mod
    from finetune.recipe.schema import Recipe
    from finetune.stages.preflight import check_data_files

    path = write("c.jsonl", ROWS)
    recipe = Recipe(data={"train": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache")})
    reads = []
    real = readers_mod.read_source
    monkeypatch.setattr(readers_mod, "read_source", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert check_data_files(recipe) == [] and len(reads) == 1
    assert check_data_files(recipe) == [] and len(reads) == 1  # unchanged: the record is enough
    assert "unchanged since it last passed these checks" in capsys.readouterr().out
    path.write_text(path.read_text() + '{"messages": [\n')
    problems = check_data_files(recipe)  # changed: read again, and the line that does not parse is named
    assert len(reads) == 2 and len(problems) == 1 and "c.jsonl line 9 is not valid JSON" in problems[0], problems
    assert check_data_files(recipe) == problems and len(reads) == 3  # a failed file is never recorded
    nocache = Recipe(data={"train": [{"path": str(path)}], "cache_dir": None})
    check_data_files(nocache)
    check_data_files(nocache)
    assert len(reads) == 5  # no cache: no record, every start reads
