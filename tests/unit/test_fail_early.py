"""Fail early, fail clearly (issue 19, issue 20 item 9), without loading any model: `--set` notation and errors,
model folders refused by `ft validate`, every stage's data read by `ft validate`, Python-side messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import Recipe, load_recipe

runner = CliRunner()
SFT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def model_folder(path: Path, config: dict | None = None, weights: str | None = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "qwen2"}))
    if weights:
        (path / weights).write_bytes(b"")
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def two_stage_recipe(tmp_path: Path, pairs: list[dict], model: Path | None = None) -> Path:
    """An SFT stage on good rows, then a DPO stage on `pairs`."""
    model = model or model_folder(tmp_path / "model")
    sft = jsonl(tmp_path / "sft.jsonl", [SFT_ROW] * 3)
    dpo = jsonl(tmp_path / "pairs.jsonl", pairs)
    p = tmp_path / "r.yaml"
    p.write_text(f"""name: t
model: {{name_or_path: {model}}}
data: {{train: [{{path: {sft}}}]}}
stages:
  - {{name: sft, kind: sft}}
  - name: dpo
    kind: dpo
    data: {{train: [{{path: {dpo}}}]}}
""")
    return p


GOOD_PAIR = {"prompt": "q", "chosen": "right", "rejected": "wrong"}


# ---------------------------------------------------------------------------------------------------- --set (19.5)


def test_set_addresses_list_items_in_both_notations(tmp_path):
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    for key in ("data.train[0].path", "data.train.0.path"):
        recipe = load_recipe(p, [f"{key}=other.jsonl", "stages[1].data.train[0].max_samples=5"])
        assert recipe.data.train[0].path == "other.jsonl"
        assert recipe.stages[1].data.train[0].max_samples == 5


def test_set_can_create_the_first_list_item(tmp_path):
    model = model_folder(tmp_path / "model")
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {{name_or_path: {model}}}\n")
    recipe = load_recipe(p, ["data.train[0].path=my.jsonl"])
    assert [s.path for s in recipe.data.train] == ["my.jsonl"]


def test_set_errors_point_at_the_set_argument_not_a_yaml_line(tmp_path):
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["data.train[0].pathh=x.jsonl"])
    [problem] = e.value.problems
    assert "(from --set data.train[0].pathh=x.jsonl)" in problem and "did you mean 'path'" in problem
    assert "line" not in problem


def test_set_with_invalid_yaml_value_exits_2_with_our_message(tmp_path):
    """Issue 20 item 9: a ParserError used to end `ft validate` with a traceback and exit 1."""
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    out = runner.invoke(app, ["validate", str(p), "--set", "lora.target_modules=[q_proj"])
    assert out.exit_code == 2, out.output
    assert "--set" in out.output and "not valid YAML" in out.output and "Traceback" not in out.output


def test_set_index_out_of_range_is_named(tmp_path):
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    with pytest.raises(RecipeError, match=r"index 3 is out of range \(the list has 1 items\)"):
        load_recipe(p, ["data.train[3].path=x"])


# ------------------------------------------------------------------------------------------- model folders (19.2)


@pytest.mark.parametrize("case, expected", [
    ("file", "is a file, not a model folder"),
    ("no weights", "has config.json but no weights"),
    ("pickle only", "holds only pickle weights (pytorch_model.bin)"),
    ("custom code", "exists only as custom Python code"),
])
def test_validate_refuses_model_folders_that_cannot_load(tmp_path, case, expected):
    if case == "file":
        model = tmp_path / "model.safetensors"
        model.write_bytes(b"")
    elif case == "no weights":
        model = model_folder(tmp_path / "m", weights=None)
    elif case == "pickle only":
        model = model_folder(tmp_path / "m", weights="pytorch_model.bin")
    else:
        model = model_folder(tmp_path / "m", {"model_type": "my_new_arch", "auto_map": {"AutoModel": "m.M"}})
    p = two_stage_recipe(tmp_path, [GOOD_PAIR], model)
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2 and expected in out.output and str(model) in out.output, out.output
    out = runner.invoke(app, ["train", str(p)])  # refused before anything loads, with the same message
    assert out.exit_code == 2 and expected in out.output and "Traceback" not in out.output, out.output


def test_custom_code_is_accepted_once_trusted(tmp_path):
    model = model_folder(tmp_path / "m", {"model_type": "my_new_arch", "auto_map": {"AutoModel": "m.M"}})
    p = two_stage_recipe(tmp_path, [GOOD_PAIR], model)
    out = runner.invoke(app, ["validate", str(p), "--set", "model.trust_remote_code=true", "-q"])
    assert out.exit_code == 0, out.output


# ---------------------------------------------------------------------------- every stage's data (19.1, no tokenizer)


@pytest.mark.parametrize("pairs, expected", [
    ([GOOD_PAIR, {"prompt": "q", "chosen": "same", "rejected": "same"}],
     "1 row: chosen answer identical to the rejected one (line 2)"),
    ([], "holds no rows"),
    ([{"question": "q", "answer": "a"}], "cannot tell the format from the columns answer, question"),
    ([SFT_ROW], "a dpo stage needs preference rows"),
])
def test_validate_reads_the_data_of_every_stage(tmp_path, pairs, expected):
    p = two_stage_recipe(tmp_path, pairs)
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2, out.output
    assert "stage dpo:" in out.output and expected in out.output


def test_validate_names_bad_encoding_of_a_later_stage(tmp_path):
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    (tmp_path / "pairs.jsonl").write_bytes(json.dumps(GOOD_PAIR).encode() + b"\n{\"prompt\": \"\xff\"}\n")
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2 and "line 2 is not valid UTF-8" in out.output, out.output


def test_validate_says_what_it_checked(tmp_path):
    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 0, out.output
    assert "the data of 2 stages (2 local sources) read and checked without a tokenizer" in out.output


# ---------------------------------------------------------------------------------------------- Python side (19.6)


def test_recipe_built_in_python_with_a_typo_raises_our_message():
    with pytest.raises(RecipeError) as e:
        Recipe(modle={"name_or_path": "x"}, data={"train": [{"path": "a.jsonl"}]})
    assert "modle" in str(e.value) and "did you mean 'model'" in str(e.value)


def test_train_errors_name_keyword_arguments_not_flags(tmp_path):
    from finetune import train

    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "finished", "stages": {}}')
    with pytest.raises(Exception) as e:
        train(p, [f"output.dir={run_dir}"])
    assert 'from_stage="NAME"' in str(e.value) and "overwrite=True" in str(e.value)
    assert "--overwrite" not in str(e.value) and "--from-stage" not in str(e.value)


def test_refusing_a_finished_run_imports_no_torch(tmp_path):
    import subprocess
    import sys

    p = two_stage_recipe(tmp_path, [GOOD_PAIR])
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "finished", "stages": {}}')
    code = ("import sys\nfrom finetune.cli import app\ntry:\n    app(['train', sys.argv[1], '--set', "
            "'output.dir=' + sys.argv[2]])\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(p), str(run_dir)], capture_output=True, text=True)
    assert "already holds a finished run" in out.stderr
    assert out.stdout.strip() == "exit 1 False", out.stdout + out.stderr


def test_report_page_renders_code_spans():
    from finetune.run.report import inline_html

    assert inline_html("run `ft train <x>` again") == "run <code>ft train &lt;x&gt;</code> again"


# -------------------------------------------------------------------------- ft generate finds exports by their files


def test_generate_tells_an_export_inside_a_run_folder_from_a_stage(tmp_path):
    from finetune.export.generate import _run_folder

    run = tmp_path / "run"
    (run / "sft" / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: t\n")
    (run / "sft" / "summary.json").write_text("{}")
    (run / "sft" / "adapter" / "adapter_config.json").write_text("{}")
    export = run / "export" / "sft-adapter"
    export.mkdir(parents=True)
    (export / "adapter_config.json").write_text("{}")
    (export / "export.json").write_text("{}")
    assert _run_folder(export) is None
    assert _run_folder(run / "sft" / "adapter") == (run, "sft")
