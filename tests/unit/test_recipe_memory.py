"""Every shipped recipe fits the GPU its header names, by the memory estimate of the path that runs for its model, with
the margin the estimate leaves for the CUDA context and fragmentation; its header and the README state that figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune.recipe.schema import Recipe
from finetune.stages.memory import RECIPE_MARGIN, recipe_estimate

ROOT = Path(__file__).resolve().parents[2]
# The published configs of the shipped recipes' models (config.json on the Hub): what memory depends on.
SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                                       num_attention_heads=32, num_key_value_heads=8,
                                                       vocab_size=128256, tie_word_embeddings=False)),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama", dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                                                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                                       vocab_size=128256, tie_word_embeddings=True)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                               tie_word_embeddings=False)),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                                 tie_word_embeddings=True)),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                                 tie_word_embeddings=True)),
    "Qwen/Qwen3-4B": ("qwen3", dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                    tie_word_embeddings=True, max_position_embeddings=40960)),
    "Qwen/Qwen3-8B": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                    tie_word_embeddings=False)),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", dict(hidden_size=4096, num_hidden_layers=32,
                                                           intermediate_size=14336, num_attention_heads=32,
                                                           num_key_value_heads=8, vocab_size=32768,
                                                           tie_word_embeddings=False)),
    "google/gemma-2-9b-it": ("gemma2", dict(hidden_size=3584, num_hidden_layers=42, intermediate_size=14336,
                                            num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                            vocab_size=256000, tie_word_embeddings=True,
                                            final_logit_softcapping=30.0)),
    "google/gemma-2-2b-it": ("gemma2", dict(hidden_size=2304, num_hidden_layers=26, intermediate_size=9216,
                                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                            vocab_size=256000, tie_word_embeddings=True,
                                            final_logit_softcapping=30.0)),
    "Qwen/Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                                             moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             vocab_size=151936, tie_word_embeddings=False)),
    "microsoft/Phi-3.5-mini-instruct": ("phi3", dict(hidden_size=3072, num_hidden_layers=32, intermediate_size=8192,
                                                     num_attention_heads=32, num_key_value_heads=32,
                                                     vocab_size=32064, tie_word_embeddings=False)),
}
SIZED = re.compile(r"^# Sized for: one (\d+) GB GPU", re.M)
STATED = re.compile(r"^# Estimate: +([\d.]+) GB", re.M)


def shipped() -> list[Path]:
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if SIZED.search(p.read_text()))


def peak_gb(path: Path) -> float:
    from transformers import AutoConfig

    recipe = Recipe.from_yaml(path)
    model_type, sizes = SHAPES[recipe.model.name_or_path]
    config = AutoConfig.for_model(model_type, **sizes)
    return max(recipe_estimate(config, recipe, s).total for s in recipe.effective_stages()) / 2**30


def test_every_model_recipe_states_its_gpu():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in shipped()}
    assert len(names) >= 20 and "llama-3/8b-qlora-sft.yaml" in names and "llama-3/8b-lora-sft-80gb.yaml" in names


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_fits_its_gpu_by_the_estimate_and_says_so(path):
    text = path.read_text()
    gpu = int(SIZED.search(text).group(1))
    peak = peak_gb(path)
    assert peak <= RECIPE_MARGIN * gpu, f"{path.name}: estimate {peak:.1f} GB > {RECIPE_MARGIN} x {gpu} GB"
    stated = STATED.search(text)
    assert stated, f"{path.name}: the header has no '# Estimate:  N GB' line (estimate: {peak:.1f} GB)"
    assert float(stated.group(1)) == pytest.approx(peak, abs=0.05), f"{path.name}: estimate is {peak:.1f} GB"
    row = f"| `{path.relative_to(ROOT / 'recipes').with_suffix('').as_posix()}` | {gpu} GB | {peak:.1f} GB |"
    assert row in (ROOT / "README.md").read_text(), f"README's GPU table lacks: {row}"
