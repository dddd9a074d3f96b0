"""GPU-shaped choices that can be checked without a GPU: loss-head chunk rows, kernel switches that would not run."""

from __future__ import annotations

import torch

from finetune.model import loss_heads
from finetune.recipe.kernel_support import recipe_kernel_problems
from finetune.recipe.schema import Recipe


def test_label_loss_chunks_are_whole_tensor_core_tiles(monkeypatch):
    # Llama 3's 128k vocabulary: 2**24 / 128256 = 130 rows would leave a 2-row tail tile; whole tiles instead
    assert loss_heads.chunk_rows(128256) == 128
    assert loss_heads.chunk_rows(32000) == 512 and loss_heads.chunk_rows(512) == 2**24 // 512
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    assert loss_heads.chunk_rows(128256, "cuda") == 512  # plenty free: up to 2**26 logits
    assert loss_heads.chunk_rows(151936, "cuda") == 384
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib, 80 * gib))
    assert loss_heads.chunk_rows(32000, "cuda") == 256  # 1 GB free: 1/16 of it holds 262 rows x 32000 x 8 bytes
    assert loss_heads.chunk_rows(128256, "cuda") == 128  # never less than one tile
    for vocab in (1000, 50257, 128256, 151936, 256000):
        assert loss_heads.chunk_rows(vocab) % loss_heads.ROW_TILE == 0
        assert loss_heads.max_chunk_rows(vocab) % loss_heads.ROW_TILE == 0


def test_fused_lora_blocks_with_dropout_are_refused_at_validation():
    recipe = Recipe(model={"name_or_path": "nobody/unknown-model"}, data={"train": [{"path": "x.jsonl"}]},
                    lora={"dropout": 0.05}, kernels={"lora_mlp": True, "lora_linear": True})
    problems = recipe_kernel_problems(recipe)  # the model type is unknown offline: the adapter rule still applies
    assert len(problems) == 1 and "lora_mlp" in problems[0] and "lora.dropout 0.05" in problems[0]
    assert recipe_kernel_problems(recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"dropout": 0.0})}))\
        == []
