"""Recipe schema, loading, extends and overrides: accept what is right, reject what is not with a useful message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from finetune.recipe.loading import RecipeError, apply_override
from finetune.recipe.schema import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides or [])
    return str(e.value)


def test_defaults_are_safe():
    r = Recipe(data={"train": [{"path": "x.jsonl"}]})
    assert r.model.trust_remote_code is False
    assert r.quantization.mode == "none"
    assert r.kernels.enabled() == []
    assert [s.kind for s in r.effective_stages()] == ["sft"]


def test_minimal_recipe_loads(tmp_path):
    r = load_recipe(write(tmp_path, "lora: {r: 8}\ndata: {train: [{path: x.jsonl}]}\n"))
    assert r.lora.r == 8
    assert r.data.train[0].path == "x.jsonl"


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    msg = problems(write(tmp_path, "lora:\n  r: 8\n  alpah: 16\n"))
    assert "lora.alpah" in msg and "line 3" in msg and "did you mean 'alpha'" in msg


def test_unknown_section_suggests(tmp_path):
    msg = problems(write(tmp_path, "trainig:\n  epochs: 1\n"))
    assert "trainig" in msg and "did you mean 'training'" in msg


def test_wrong_type_and_range_name_the_path(tmp_path):
    msg = problems(write(tmp_path, "lora: {r: 0}\ntraining: {micro_batch_size: many}\n"))
    assert "lora.r" in msg and "greater than or equal to 1" in msg
    assert "training.micro_batch_size" in msg and "'many'" in msg


def test_literal_lists_allowed_values(tmp_path):
    msg = problems(write(tmp_path, "quantization: {mode: int3}\n"))
    assert "quantization.mode" in msg and "'nf4'" in msg


def test_all_problems_reported_at_once(tmp_path):
    msg = problems(write(tmp_path, "lora: {r: -1, dropout: 2}\nfoo: 1\n"))
    assert "3 problem(s)" in msg


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    msg = problems(write(tmp_path, "lora:\n  r: [8\n  alpha: 3\n"))
    assert "YAML syntax error" in msg and "line" in msg and "column" in msg


def test_missing_file(tmp_path):
    msg = problems(tmp_path / "nope.yaml")
    assert "recipe file not found" in msg and "nope.yaml" in msg


def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path, "name: base\ndata: {train: [{path: x}]}\nlora: {r: 8, alpha: 16}\n"
          "training: {learning_rate: 1.0e-4, epochs: 2}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\nlora: {r: 32}\n", "child.yaml")
    r = load_recipe(child)
    assert (r.name, r.lora.r, r.lora.alpha, r.training.epochs) == ("child", 32, 16, 2)


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    assert "cycle" in problems(tmp_path / "a.yaml")


def test_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "lora: {r: 8}\n")
    r = load_recipe(p, ["data.train=[{path: x}]", "training.learning_rate=1e-4", "lora.alpha=32",
                        "lora.target_modules=[q_proj, v_proj]"])
    assert r.training.learning_rate == pytest.approx(1e-4)
    assert r.lora.alpha == 32 and r.lora.target_modules == ["q_proj", "v_proj"]


def test_override_unknown_key_is_an_error(tmp_path):
    msg = problems(write(tmp_path, "lora: {r: 8}\n"), ["lora.rank=4"])
    assert "lora.rank" in msg and "did you mean 'r'" in msg


def test_override_addresses_stages_by_name():
    data = {"stages": [{"name": "sft", "kind": "sft"}, {"name": "dpo", "kind": "dpo"}]}
    apply_override(data, "stages.dpo.dpo.beta=0.3")
    assert data["stages"][1]["dpo"]["beta"] == 0.3
    with pytest.raises(RecipeError, match="no list item named 'rl'"):
        apply_override(data, "stages.rl.dpo.beta=0.3")


def test_override_without_equals(tmp_path):
    assert "KEY=VALUE" in problems(write(tmp_path, "{}\n"), ["lora.r"])


def test_stage_training_overrides_are_checked(tmp_path):
    text = "data: {train: [{path: x}]}\nstages:\n  - {name: a, kind: sft, training: {learning_rate: 5, epohcs: 1}}\n"
    msg = problems(write(tmp_path, text))
    assert "stages[0].training.epohcs" in msg and "did you mean 'epochs'" in msg
    assert "stages[0].training.learning_rate" in msg


def test_stage_training_merges_with_shared():
    r = Recipe(
        training={"learning_rate": 1e-4, "epochs": 2},
        data={"train": [{"path": "x"}]},
        stages=[{"name": "a", "kind": "sft"}, {"name": "b", "kind": "dpo", "training": {"learning_rate": 5e-6}}],
    )
    assert r.stage_training(r.stages[0]).learning_rate == pytest.approx(1e-4)
    b = r.stage_training(r.stages[1])
    assert b.learning_rate == pytest.approx(5e-6) and b.epochs == 2


def test_cross_field_rules(tmp_path):
    text = (
        "data: {train: [{path: x}]}\n"
        "stages:\n  - {name: a, kind: dpo}\n  - {name: a, kind: sft}\n"
    )
    msg = problems(write(tmp_path, text))
    assert "used more than once" in msg
    assert "no SFT adapter to start from" in msg


def test_no_training_data_is_reported(tmp_path):
    assert "no training data" in problems(write(tmp_path, "lora: {r: 8}\n"))


RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))


def _recipe_id(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


def _offline_hub_id(problem: str) -> bool:
    """A Hub model or dataset id that cannot be reached offline (never one of the project's own folders)."""
    found = re.match(r"[\w.\[\]]+: '([^']+)' is not a local path.* the Hub cannot be reached", problem)
    return bool(found) and Path(found.group(1)).parts[0] not in {"models", "data", "runs", ".", ".."}


@pytest.mark.parametrize("path", RECIPES, ids=_recipe_id)
def test_every_shipped_recipe_validates(path, in_root):
    from finetune.stages.preflight import check_recipe_paths

    recipe = load_recipe(path)
    found = check_recipe_paths(recipe)
    # Recipes for real models name Hub ids (models, datasets) that cannot be reached offline; all else must resolve.
    assert [p for p in found if not _offline_hub_id(p)] == [], found


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name != "base"], ids=_recipe_id)
def test_every_shipped_recipe_says_how_to_launch_it_and_what_it_needs(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"ft train {path.relative_to(ROOT)}" in header  # the launch command names this very file
    assert "Sized for:" in header
    if path.parent != ROOT / "recipes":  # the model recipes share their settings through a base
        assert "extends" in yaml.safe_load(path.read_text())


def test_recipe_datasets_rows_are_understood():
    """The Hub datasets the model recipes name (UltraChat, UltraFeedback) have these row shapes."""
    from finetune.data.formats import normalize_preference, normalize_sft, resolve_format
    from finetune.data.readers import Table

    chat = {"prompt": "Hi?", "prompt_id": "1", "messages": [{"role": "user", "content": "Hi?"},
                                                            {"role": "assistant", "content": "Hello!"}]}
    table = Table("data.train[0]", "HuggingFaceH4/ultrachat_200k", [chat], [("hub", "row 1")])
    assert resolve_format(table, "auto")[0] == "messages"
    assert normalize_sft(table, "messages") == [{"messages": chat["messages"]}]
    pair = {"prompt": "2+2?", "prompt_id": "1", "score_chosen": 9.0, "score_rejected": 2.0,
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    table = Table("stages[1].data.train[0]", "HuggingFaceH4/ultrafeedback_binarized", [pair], [("hub", "row 1")])
    assert resolve_format(table, "auto")[0] == "preference"
    assert normalize_preference(table) == [{"prompt": [{"role": "user", "content": "2+2?"}],
                                            "chosen": [{"role": "assistant", "content": "4"}],
                                            "rejected": [{"role": "assistant", "content": "5"}]}]
