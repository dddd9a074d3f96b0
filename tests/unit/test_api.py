"""The Python API: `from finetune import Recipe, train` is light to import, runs the CLI code path, returns the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finetune
from finetune import Recipe, RecipeError, train


def tiny_recipe(tiny_model: Path, data: dict[str, Path], out: Path) -> Recipe:
    """Built in Python, no YAML: 6 steps of LoRA SFT on the tiny model."""
    return Recipe(
        name="api",
        model={"name_or_path": str(tiny_model), "dtype": "float32"},
        lora={"r": 4, "alpha": 8},
        data={"train": [{"path": str(data["train"])}], "max_length": 64},
        training={"max_steps": 6, "micro_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1, "seed": 3},
        output={"dir": str(out)},
    )


def test_import_is_light():
    code = "import sys, finetune; finetune.Recipe; finetune.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert set(finetune.__all__) == {"Recipe", "RecipeError", "FinetuneError", "RunResult", "train"}


def test_train_matches_the_cli_and_returns_the_run(tiny_model, addition_data, tmp_path):
    from finetune.cli import app
    from finetune.recipe.loading import dump_recipe

    recipe = tiny_recipe(tiny_model, addition_data, tmp_path / "api")
    run = train(recipe, ["lora.r=8"])
    assert recipe.lora.r == 4  # the caller's object is not changed by overrides

    assert run.run_dir == tmp_path / "api" and (run.run_dir / "summary.json").exists()
    assert run.adapter() == run.run_dir / "sft" / "adapter" and (run.adapter() / "adapter_config.json").exists()
    assert run.stages["sft"]["metrics"]["steps"] == 6
    # which attention path ran, counted (padding-free rows per sample on this CPU: 2 layers x 6 steps, no fallback)
    assert run.stages["sft"]["attention_calls"] == {"sdpa per sample": 12}
    losses = [r["loss"] for r in run.metrics("sft") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]

    # The same recipe through `ft train` gives the same losses: one code path.
    path = tmp_path / "cli.yaml"
    path.write_text(dump_recipe(recipe))
    out = CliRunner().invoke(app, ["train", str(path), "--set", "lora.r=8", "--set", f"output.dir={tmp_path / 'cli'}"])
    assert out.exit_code == 0, out.output
    cli = finetune.RunResult.from_dir(tmp_path / "cli")
    assert [r["loss"] for r in cli.metrics() if "loss" in r] == pytest.approx(losses, rel=1e-5)

    with pytest.raises(finetune.FinetuneError, match="already holds a finished run"):
        train(path, ["lora.r=8", f"output.dir={tmp_path / 'cli'}"])


def test_bad_input_fails_before_any_model_loads(tmp_path):
    recipe = Recipe(model={"name_or_path": str(tmp_path / "no-model")}, data={"train": [{"path": "missing.jsonl"}]})
    with pytest.raises(RecipeError) as e:
        train(recipe)
    assert "model.name_or_path" in str(e.value) and "data.train[0].path" in str(e.value)
    with pytest.raises(RecipeError, match="did you mean 'r'"):
        train(recipe, ["lora.rank=4"])
    with pytest.raises(TypeError, match="takes a Recipe or the path"):
        train({"lora": {"r": 4}})  # type: ignore[arg-type]


def test_run_result_from_a_folder_without_a_run(tmp_path):
    with pytest.raises(finetune.FinetuneError, match="summary.json is missing"):
        finetune.RunResult.from_dir(tmp_path)


def test_train_in_several_processes_launches_the_resolved_recipe(tiny_model, addition_data, tmp_path, monkeypatch):
    """`train(nproc=2)` hands `ft train` the recipe as resolved in Python, then reads the run back from its folder."""
    from finetune.distributed import launch
    from finetune.recipe.schema import load_recipe
    from finetune.run.files import write_json_atomic

    recipe = tiny_recipe(tiny_model, addition_data, tmp_path / "multi")
    seen = {}

    def fake_relaunch(nproc: int, args: list[str]) -> None:
        seen.update(nproc=nproc, args=args, recipe=load_recipe(args[1]))  # the temporary file exists only now
        write_json_atomic(tmp_path / "multi" / "summary.json", {"status": "finished", "stages": {"sft": {}}})

    monkeypatch.setattr(launch, "relaunch", fake_relaunch)
    run = train(recipe, ["lora.r=8"], nproc=2, from_stage="sft", overwrite=True)
    assert seen["nproc"] == 2 and seen["args"][0] == "train" and seen["args"][2:] == ["--from-stage", "sft",
                                                                                       "--overwrite"]
    assert seen["recipe"].lora.r == 8 and seen["recipe"].model == recipe.model
    assert run.run_dir == tmp_path / "multi" and list(run.stages) == ["sft"]
    with pytest.raises(RecipeError, match="cannot be split evenly over 3 processes"):
        train(recipe, nproc=3)  # micro batch 8 x 1: refused before anything starts
