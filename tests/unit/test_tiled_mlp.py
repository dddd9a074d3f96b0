"""Tiled MLP (`training.tiled_mlp`): the same loss and gradients as the whole-row MLP, fewer bytes kept for backward,
tiles counted; auto leaves short rows whole; MoE blocks are left whole with the reason recorded."""

from __future__ import annotations

import pytest
import torch
from tinylora import adapted, loss_and_grads

from finetune.model import tiled_mlp


def _saved_bytes(model, ids) -> int:
    """Bytes the forward keeps for backward (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def _assert_same(got, want):
    loss_t, grads_t = got
    loss, grads = want
    torch.testing.assert_close(loss_t, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_t.keys() and any("mlp" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_t[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_mlp_same_loss_and_gradients(tiny_model):
    ids = torch.randint(3, 100, (1, 96))
    model = adapted(tiny_model)
    whole = loss_and_grads(model, ids)
    line = tiled_mlp.install(model.get_base_model(), 4)
    assert line and "in 4 tiles" in line
    tiled_mlp.tiled_calls(reset=True)
    tiled = loss_and_grads(model, ids)
    layers = len(tiled_mlp.decoder_mlps(model.get_base_model()))
    assert layers >= 2 and tiled_mlp.tiled_calls() == {"tiled": layers, "tiles": 4 * layers}
    _assert_same(tiled, whole)


def test_tiled_mlp_with_lora_dropout_recomputes_the_same_masks(tiny_model, monkeypatch):
    """With dropout a tile draws its own masks (not the whole row's), and its recompute in backward draws the same
    ones: the gradients equal those of the same tiles run without recomputation."""
    ids = torch.randint(3, 100, (1, 96))
    model = adapted(tiny_model, dropout=0.2)
    tiled_mlp.install(model.get_base_model(), 4)
    tiled = loss_and_grads(model, ids)
    monkeypatch.setattr(tiled_mlp, "checkpoint", lambda fn, x, use_reentrant: fn(x))  # keep, do not recompute
    kept = loss_and_grads(model, ids)
    _assert_same(tiled, kept)
    whole_masks = adapted(tiny_model, dropout=0.2)
    assert abs(loss_and_grads(whole_masks, ids)[0] - kept[0]) > 1e-6  # other masks: the test can tell


def test_tiled_mlp_keeps_fewer_bytes_for_backward(tiny_model):
    ids = torch.randint(3, 100, (1, 128))
    model = adapted(tiny_model)
    whole = _saved_bytes(model, ids)
    tiled_mlp.install(model.get_base_model(), 8)
    tiled = _saved_bytes(model, ids)
    cfg = model.get_base_model().config
    # per layer and token the MLP keeps gate, up, the activation and the down projection's LoRA input (4 x
    # intermediate float32 values): tiled, it keeps none of them in the forward
    expected = cfg.num_hidden_layers * ids.shape[1] * 4 * cfg.intermediate_size * 4
    assert whole - tiled >= 0.9 * expected, (whole, tiled, expected)


def test_tiled_mlp_in_no_grad_and_short_rows_is_the_plain_forward(tiny_model):
    model = adapted(tiny_model)
    tiled_mlp.install(model.get_base_model(), "auto")
    tiled_mlp.tiled_calls(reset=True)
    ids = torch.randint(3, 100, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()  # 64 tokens: auto leaves it whole
    with torch.no_grad():
        model(input_ids=ids)
    assert tiled_mlp.tiled_calls() == {}


def test_tile_count_auto_and_fixed():
    assert tiled_mlp.tile_count("auto", tiled_mlp.AUTO_FROM) == 1
    assert tiled_mlp.tile_count("auto", 16384) == 16384 // tiled_mlp.AUTO_TILE
    assert tiled_mlp.tile_count("off", 100_000) == 1
    assert tiled_mlp.tile_count(4, 3) == 3 and tiled_mlp.tile_count(4, 1000) == 4


def test_moe_blocks_are_left_whole():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                         num_experts_per_tok=2, head_dim=16)
    model = Qwen3MoeForCausalLM(cfg)
    line = tiled_mlp.install(model, 4)
    assert line and line.startswith("not applied: 2 Mixture-of-Experts blocks")
    assert not any(tiled_mlp.is_tiled(m) for _, m in tiled_mlp.decoder_mlps(model))


def test_recipe_key():
    from pydantic import ValidationError

    from finetune.recipe.schema import TrainingConfig

    assert TrainingConfig().tiled_mlp == "auto"
    assert TrainingConfig(tiled_mlp=8).tiled_mlp == 8
    with pytest.raises(ValidationError):
        TrainingConfig(tiled_mlp=1)
