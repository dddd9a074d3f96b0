"""`ft eval`'s inputs as a clumsy user writes them: task rows in natural shapes are read, the rest refused naming the
file, rows and fix (also by `ft validate`, before any model loads); non-UTF-8 files; models with padded vocabularies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.eval import scoring
from finetune.eval.taskrows import load_task_file

USER = {"role": "user", "content": "2+2?"}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_plain_string_prompts_and_messages_without_answer_are_read(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [
        {"prompt": "2+2?", "answer": "4"},
        {"messages": [USER, {"role": "assistant", "content": "4"}]},  # no answer: the last assistant message
        {"prompt": [USER], "answer": 4},  # a number is an answer too
    ])
    rows = load_task_file(path, "task file", ["exact_match"])
    from finetune.eval.tasks import _prompt_of

    assert [_prompt_of(r) for r in rows] == [[USER], [USER], [USER]]
    assert [r["answer"] for r in rows] == ["4", "4", 4]


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": 7, "answer": "7"}, "neither text nor a list of {role, content} messages"),
    ({"prompt": "2+2?", "answer": {"value": 4}}, "an `answer` that is not text or a number"),
    ({"messages": [{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "4"}]},
     "no user turn to answer"),
    ({"messages": [USER]}, "no `answer`"),  # nothing to take the answer from
    ({"messages": ["2+2?"], "answer": "4"}, "messages that are not {role, content} objects with text content"),
    ({"prompt": [{"role": "user", "content": 4}], "answer": "4"}, "messages that are not {role, content} objects"),
])
def test_task_rows_that_cannot_be_asked_or_answered_are_named(tmp_path, row, problem):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "ok?", "answer": "ok"}, row])
    with pytest.raises(FinetuneError) as err:
        load_task_file(path, "task file", ["exact_match"])
    assert f"{path}: rows that cannot be scored" in str(err.value)
    assert f"{problem}" in str(err.value) and "row(s) 2 (1 of 2)" in str(err.value)


def test_a_task_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "ok", "answer": "a"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(FinetuneError, match=r"task file: .*t.jsonl line 2 is not UTF-8 text \(byte \d+\); save"):
        load_task_file(str(path), "task file", ["exact_match"])


def test_general_text_that_is_not_utf8_names_the_line(tmp_path):
    from finetune.eval.suite import read_general_text

    path = tmp_path / "g.txt"
    path.write_bytes(b"fine\nnot \xff fine\n")
    with pytest.raises(FinetuneError, match=r"eval.general_text: .*g.txt line 2 is not UTF-8"):
        read_general_text(str(path), None)


def test_validate_refuses_a_bad_task_eval_before_any_model_loads(tmp_path, tiny_model):
    from finetune.recipe.schema import load_recipe
    from finetune.stages.preflight import check_recipe_paths

    train = _jsonl(tmp_path / "train.jsonl", [{"messages": [USER, {"role": "assistant", "content": "4"}]}] * 4)
    task = _jsonl(tmp_path / "task.jsonl", [{"prompt": "2+2?", "answer": {"value": 4}}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model}}}\n"
                      f"data: {{train: [{{path: {train}}}], task_eval: {task}}}\n"
                      f"output: {{dir: {tmp_path / 'runs'}}}\n")
    problems = check_recipe_paths(load_recipe(recipe, []))
    assert any(p.startswith("data.task_eval: ") and "an `answer` that is not text" in p for p in problems), problems
    _jsonl(tmp_path / "task.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    assert not check_recipe_paths(load_recipe(recipe, []))


def _fixed(rows: list[list[float]]) -> scoring.Forward:
    table = torch.tensor(rows)
    return lambda ids, mask: table[: ids.shape[1]].unsqueeze(0).expand(ids.shape[0], -1, -1).clone()


def test_kl_against_a_padded_vocabulary_uses_the_common_rows():
    # the other model's output layer has a third (padding) row; the tokenizer only knows tokens 0 and 1
    tuned = _fixed([[math.log(3), 0.0]] * 4)
    padded = _fixed([[0.0, 0.0, 5.0]] * 4)
    samples = [([0, 0, 1], [0, 0, 1])]
    got = scoring.compare(tuned, padded, samples, pad_id=0)
    expected = scoring.compare(tuned, _fixed([[0.0, 0.0]] * 4), samples, pad_id=0)
    assert got["common_vocab"] == 2 and "common_vocab" not in expected
    assert got["mean_kl"] == pytest.approx(expected["mean_kl"]) and got["loss"] == pytest.approx(expected["loss"])
    with pytest.raises(FinetuneError, match="share only the first 2 vocabulary rows"):
        scoring.compare(tuned, padded, [([0, 2], [0, 2])], pad_id=0)


def test_validate_reads_the_eval_sections_files_too(tmp_path, tiny_model):
    from finetune.recipe.schema import load_recipe
    from finetune.stages.preflight import check_recipe_paths

    train = _jsonl(tmp_path / "train.jsonl", [{"messages": [USER, {"role": "assistant", "content": "4"}]}] * 4)
    task = _jsonl(tmp_path / "task.jsonl", [{"prompt": 7, "answer": "7"}])
    general = tmp_path / "general.txt"
    general.write_bytes(b"plain text\n\xff\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: [{{path: {train}}}]}}\n"
                      f"eval: {{general_text: {general}, tasks: [{{path: {task}}}, {{path: {tmp_path}/no.jsonl}}]}}\n"
                      f"output: {{dir: {tmp_path / 'runs'}}}\n")
    problems = check_recipe_paths(load_recipe(recipe, []))
    assert any(p.startswith(f"eval.tasks[0]: {task}: rows that cannot be scored") for p in problems), problems
    assert f"eval.tasks[1].path: '{tmp_path / 'no.jsonl'}' does not exist" in problems
    assert f"eval.general_text: {general} line 2 is not UTF-8 text (byte 11); save the file as UTF-8" in problems


def test_validate_reads_the_eval_files_without_importing_torch(tmp_path, tiny_model):
    import subprocess
    import sys

    train = _jsonl(tmp_path / "train.jsonl", [{"messages": [USER, {"role": "assistant", "content": "4"}]}] * 4)
    task = _jsonl(tmp_path / "task.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    (tmp_path / "general.txt").write_text("plain text\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model}}}\n"
                      f"data: {{train: [{{path: {train}}}], task_eval: {task}}}\n"
                      f"eval: {{general_text: {tmp_path}/general.txt, tasks: [{{path: {task}}}]}}\n"
                      f"output: {{dir: {tmp_path / 'runs'}}}\n")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
            f"assert CliRunner().invoke(app, ['validate', {str(recipe)!r}, '-q']).exit_code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
