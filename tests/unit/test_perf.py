"""FLOPs accounting, MFU and the benchmark probe's token counts (scripts/bench_probe.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bench_probe import _Timeline, causal_context, linear_shapes, mfu, train_flops_per_token


def _config(**kw):
    base = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=3, vocab_size=100, head_dim=None)
    return SimpleNamespace(**{**base, **kw})


def test_linear_shapes_follow_gqa():
    shapes = linear_shapes(_config())
    assert shapes["q_proj"] == (8, 8) and shapes["k_proj"] == (8, 4) and shapes["v_proj"] == (8, 4)
    assert shapes["o_proj"] == (8, 8) and shapes["gate_proj"] == (8, 16) and shapes["down_proj"] == (16, 8)


def test_linear_shapes_of_a_moe_layer_are_what_one_token_runs():
    """Qwen3-MoE (moe_intermediate_size) and Mixtral (intermediate_size is an expert's): the router, and the top-k
    routed experts as one MLP k times an expert's size; the idle experts cost a token nothing."""
    qwen = linear_shapes(_config(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6))
    assert qwen["gate_proj"] == (8, 12) and qwen["down_proj"] == (12, 8) and qwen["router"] == (8, 8)
    mixtral = linear_shapes(_config(num_local_experts=4, num_experts_per_tok=2))
    assert mixtral["up_proj"] == (8, 32) and mixtral["router"] == (8, 4) and mixtral["q_proj"] == (8, 8)
    assert "router" not in linear_shapes(_config())


def test_train_flops_per_token_by_hand():
    cfg = _config()
    # per layer: q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 = 576 weights; 3 layers
    n_lin = 3 * 576
    f = train_flops_per_token(cfg, lora_rank=2, lora_targets=["q_proj", "down_proj"], context=5.0, label_fraction=0.5)
    assert f.base_linear == 4 * n_lin
    assert f.lm_head == 4 * 100 * 8 * 0.5
    assert f.attention == 12 * 3 * 2 * 4 * 5.0  # layers x heads x head_dim x context
    assert f.lora == 6 * 2 * 3 * ((8 + 8) + (16 + 8))
    assert f.total == pytest.approx(f.base_linear + f.lm_head + f.attention + f.lora)
    everything = train_flops_per_token(cfg, lora_rank=2, lora_targets="all-linear")
    assert everything.lora == 6 * 2 * 3 * sum(i + o for i, o in linear_shapes(cfg).values())


def test_causal_context_and_mfu():
    assert causal_context([1, 3]) == pytest.approx((1 + 6) / 4)  # keys per query: 1 | 1, 2, 3
    assert causal_context([4]) == pytest.approx(2.5)
    assert mfu(1e6, 10.0, 1e8) == pytest.approx(0.1)


def test_probe_counts_real_padded_and_label_tokens(tmp_path):
    t = _Timeline(str(tmp_path / "p.json"))
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
              "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, -100, -100, -100]])}
    t.count(padded)
    packed = {"input_ids": torch.ones(1, 7, dtype=torch.long), "labels": torch.tensor([[-100, 2, 3, -100, -100, 6, 7]])}
    t.count(packed)
    pairs = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 1, 1]] * 4)}
    t.count(pairs)
    d = t.data
    assert (d["micro_batches"], d["rows"]) == (3, 2 + 1 + 4)
    assert d["tokens_real"] == 7 + 7 + 12 and d["tokens_slots"] == 10 + 7 + 12
    assert d["tokens_labels"] == 4 + 4 + 8
    # a padded batch the model ran without its padding (our padding-free DPO head): no padding slots
    t.count(padded, padding_free=True)
    assert d["tokens_real"] == 26 + 7 and d["tokens_slots"] == 29 + 7
    t.write()
    assert (tmp_path / "p.json").read_text().startswith("{")
