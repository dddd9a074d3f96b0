"""GRPO's memory estimate counts sampling's key/value cache: checked against the cache transformers' `generate`
really holds on the tiny model, and the estimate's peak is the larger of the sampling and training phases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.recipe.schema import Recipe
from finetune.stages.memory import Memory, ModelShape, generation_cache_bytes, recipe_estimate

ROOT = Path(__file__).resolve().parents[2]
TINY_CHAT = ROOT / "models" / "tiny-chat"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_cache_matches_what_generate_keeps(dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY_CHAT), dtype=dtype).eval()
    completions, prompt, new = 6, 20, 12
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (completions, prompt))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=2)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    act_bytes = torch.finfo(dtype).bits // 8
    shape = ModelShape.of(model.config)
    logits = completions * shape.vocab * 4
    estimated = generation_cache_bytes(shape, completions, prompt + new, act_bytes) - logits
    # the cache holds every token but the last sampled one, which is never fed back
    assert held == pytest.approx(estimated * (prompt + new - 1) / (prompt + new), rel=1e-6), (held, estimated)


def test_grpo_estimate_includes_the_cache_and_peaks_at_the_larger_phase():
    from transformers import AutoConfig

    recipe = Recipe.from_yaml(ROOT / "recipes" / "quickstart-grpo.yaml")
    stage = next(s for s in recipe.effective_stages() if s.kind == "grpo")
    config = AutoConfig.from_pretrained(str(TINY_CHAT))
    memory = recipe_estimate(config, recipe, stage)
    training = recipe.stage_training(stage)
    shape = ModelShape.of(config)
    seq = recipe.stage_data(stage).max_length  # prompt + completion, at most max_length
    batch = training.micro_batch_size * training.gradient_accumulation_steps
    kv = batch * seq * shape.layers * 2 * shape.kv_dim * 4  # float32 on the CPU
    assert memory.generation_cache == kv + batch * shape.vocab * 4
    assert "generation KV cache" in memory.line()
    static = memory.quantized_weights + memory.frozen_weights + memory.adapter
    for cache in (0, 10 * memory.total):
        m = Memory(**{**memory.__dict__, "generation_cache": cache})
        assert m.total == static + max(memory.kept_activations + memory.recomputed_layer + memory.loss, cache)
    sft = next(s for s in recipe.effective_stages() if s.kind == "sft")
    assert recipe_estimate(config, recipe, sft).generation_cache == 0
