"""`ft train --dry-run --max-length-search CAP`: the longest sample whose training step fits CAP by the estimate, the
estimate at long context with a tiled MLP, and the memory sizes the flag accepts."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from finetune.recipe.schema import Recipe
from finetune.stages.length_search import longest_fitting, parse_size
from finetune.stages.memory import recipe_estimate

GB = 2**30
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=40960)


def _recipe(tiled="auto", checkpointing=True, micro=1) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": "Qwen/Qwen3-4B", "dtype": "bfloat16"},
        "quantization": {"mode": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32}, "data": {"train": [{"path": "x.jsonl"}], "max_length": 32768},
        "training": {"micro_batch_size": micro, "gradient_checkpointing": checkpointing, "precision": "bf16",
                     "tiled_mlp": tiled}})


def _config():
    return AutoConfig.for_model("qwen3", **QWEN3_4B)


@pytest.mark.parametrize("tiled", ["auto", "off", 8])
@pytest.mark.parametrize("cap_gb", [6, 9, 12])
def test_longest_fitting_is_the_boundary_of_the_estimate(tiled, cap_gb):
    recipe, config = _recipe(tiled), _config()
    stage = recipe.effective_stages()[0]
    found = longest_fitting(config, recipe, stage, cap_gb * GB)
    assert found is not None
    length, memory = found
    assert memory.total <= cap_gb * GB
    assert memory.total == recipe_estimate(config, recipe, stage, seq_len=length).total
    assert length < QWEN3_4B["max_position_embeddings"]
    assert recipe_estimate(config, recipe, stage, seq_len=length + 1).total > cap_gb * GB  # the longest


def test_tiled_mlp_lengthens_what_fits():
    config = _config()
    fits = {}
    for tiled in ("off", "auto"):
        recipe = _recipe(tiled)
        fits[tiled] = longest_fitting(config, recipe, recipe.effective_stages()[0], 9 * GB)[0]
    assert fits["auto"] > 1.1 * fits["off"], fits
    recipe = _recipe("auto")  # at 32k the recomputed layer holds one 2048-token tile of MLP intermediates
    stage = recipe.effective_stages()[0]
    tiled = recipe_estimate(config, recipe, stage).recomputed_layer
    whole = recipe_estimate(config, _recipe("off"), stage).recomputed_layer
    i, tokens = QWEN3_4B["intermediate_size"], 32768
    saved = (tokens - 2048) * (2 * (4 * i + 3 * 16))  # bf16: gate, act, up, down's input and 3 LoRA outputs
    assert whole - tiled == saved


def test_nothing_fits_and_the_context_limit():
    recipe, config = _recipe(), _config()
    stage = recipe.effective_stages()[0]
    assert longest_fitting(config, recipe, stage, 1 * GB) is None  # the 4-bit weights alone are 1.75 GB
    length, _ = longest_fitting(config, recipe, stage, 80 * GB)
    assert length == QWEN3_4B["max_position_embeddings"]


def test_parse_size():
    assert parse_size("8GB") == 8 * GB == parse_size("8 GiB") == parse_size("8g")
    assert parse_size("500MB") == 500 * 2**20 and parse_size("1.5GB") == int(1.5 * GB) and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="like 8GB"):
        parse_size("eight gigs")


def test_cli_needs_dry_run_and_a_size(tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: [{path: x.jsonl}]}\n")
    result = CliRunner().invoke(app, ["train", str(path), "--max-length-search", "8GB"])
    assert result.exit_code == 2 and "pass it with --dry-run" in result.output
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run", "--max-length-search", "lots"])
    assert result.exit_code == 2 and "--max-length-search: 'lots' is not a memory size" in result.output
