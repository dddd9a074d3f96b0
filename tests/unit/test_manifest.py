"""manifest.json: what produced a run (recipe hash, data hashes, base model, versions, code, seeds, hardware)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import finetune
from finetune.recipe.schema import Recipe
from finetune.run.manifest import build_manifest, lineage_lines, recipe_hash, write_manifest

TOKEN = "hf_" + "Ab1" * 10


@pytest.fixture
def recipe(tmp_path) -> Recipe:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.jsonl").write_text('{"messages": [1]}\n')
    return Recipe.model_validate({
        "name": "m", "model": {"name_or_path": str(model)},
        "data": {"train": [{"path": str(tmp_path / "train.jsonl")}], "eval": [{"path": str(tmp_path / "eval")}]},
        "training": {"seed": 7},
        "stages": [{"name": "sft", "kind": "sft"},
                   {"name": "dpo", "kind": "dpo", "training": {"seed": 8},
                    "data": {"train": [{"path": "someone/prefs", "revision": "v1"},
                                       {"path": str(tmp_path / "train.jsonl")}]}}],
        "tracking": {"wandb": {"project": "p", "name": f"run {TOKEN}"}},
    })


def test_manifest_records_hashes_sources_seeds_and_environment(recipe, tmp_path):
    m = build_manifest(recipe, "recipes/m.yaml")
    assert m["recipe"]["sha256"] == recipe_hash(recipe) and m["recipe"]["source"] == "recipes/m.yaml"
    data = {d["key"]: d for d in m["data"]}
    assert data["data.train[0]"]["sha256"] == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    assert data["data.eval[0]"]["files"] == 1 and data["data.eval[0]"]["bytes"] == 18
    assert data["stages[1].data.train[0]"] == {"key": "stages[1].data.train[0]", "path": "someone/prefs",
                                               "hub_id": "someone/prefs", "revision": "v1"}
    assert len(m["data"]) == 3  # the train file shared by both stages is listed once
    model = m["base_model"]
    assert model["files_sha256"]["config.json"] == hashlib.sha256(b'{"model_type": "llama"}').hexdigest()
    assert model["weights"] == {"model.safetensors": 1000}
    assert m["seeds"] == {"sft": 7, "dpo": 8}
    assert m["packages"]["torch"] and m["packages"]["transformers"] and m["packages"]["python"]
    if (Path(finetune.__file__).parents[1] / ".git").exists():  # a git checkout (CI's fresh clone is one)
        assert len(m["code"]["finetune"]["commit"]) == 40
    assert m["hardware"]["cpu_count"] >= 1
    assert TOKEN not in json.dumps(m)  # the recipe is redacted


def test_recipe_hash_follows_what_is_trained_not_where_it_goes(recipe):
    moved = recipe.model_copy(deep=True)
    moved.output.dir = "elsewhere"
    moved.output.overwrite = True
    assert recipe_hash(moved) == recipe_hash(recipe)
    changed = recipe.model_copy(deep=True)
    changed.training.learning_rate = 1e-5
    assert recipe_hash(changed) != recipe_hash(recipe)


def test_resumed_run_keeps_creation_time_and_model_cards_get_lineage(recipe, tmp_path):
    run = tmp_path / "run"
    first = write_manifest(recipe, run)
    second = write_manifest(recipe, run)
    assert second["created"] == first["created"] and len(second["resumed"]) == 1
    lines = lineage_lines(json.loads((run / "manifest.json").read_text()))
    assert lines[0] == f"- recipe sha256: `{recipe_hash(recipe)[:16]}`"
    assert any("someone/prefs" in line and "revision v1" in line for line in lines)
    assert any(line.startswith("- seeds: sft=7, dpo=8") for line in lines)
