"""A finished stage's model is freed before the next stage loads its own (on a GPU both would sit there together)."""

from __future__ import annotations

import gc
import weakref

from test_dpo_pipeline import write_pairs

import finetune.stages.dpo as dpo_stage
import finetune.stages.sft as sft_stage
from finetune.cli import app


def test_the_sft_model_is_gone_when_dpo_loads(tiny_model, addition_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: teardown
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 4, alpha: 8}}
data: {{train: [{{path: {addition_data['train']}}}], max_length: 48, cache_dir: null}}
training: {{max_steps: 1, micro_batch_size: 4}}
stages:
  - {{name: sft, kind: sft}}
  - name: dpo
    kind: dpo
    data: {{train: [{{path: {pairs}}}], max_length: 48, cache_dir: null}}
    training: {{max_steps: 1}}
output: {{dir: {tmp_path / 'run'}}}
""")
    sft_models: list[weakref.ref] = []
    alive_when_dpo_loads: list[bool] = []
    load_sft, load_dpo = sft_stage.load_model, dpo_stage.load_model

    def load_and_watch(*args, **kwargs):
        model = load_sft(*args, **kwargs)
        sft_models.append(weakref.ref(model))
        return model

    def check_then_load(*args, **kwargs):
        alive_when_dpo_loads.append(sft_models[0]() is not None)
        return load_dpo(*args, **kwargs)

    monkeypatch.setattr(sft_stage, "load_model", load_and_watch)
    monkeypatch.setattr(dpo_stage, "load_model", check_then_load)
    gc.disable()  # only what the pipeline frees itself counts, not a collection that happens to run meanwhile
    try:
        result = CliRunner().invoke(app, ["train", str(recipe)])
    finally:
        gc.enable()
    assert result.exit_code == 0, result.output
    assert len(sft_models) == 1 and alive_when_dpo_loads == [False]
