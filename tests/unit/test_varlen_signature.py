"""torch's varlen_attn is called with keywords the installed torch takes: read from its signature, bound against it.

The GPU image's torch is older than ours and its `varlen_attn` may lack `enable_gqa` or `window_size`: the keywords we
pass are chosen from the installed signature, and a torch that cannot express causal grouped-query attention gets the
per-sample sdpa with the reason in the banner and in the counts of the paths that ran.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from finetune.model import attention
from finetune.model.attention import (
    NAME,
    VARLEN,
    attention_calls,
    choose_padding_free_attention,
    per_sample_sdpa,
    varlen_attention,
    varlen_features,
    varlen_kwargs,
    varlen_problem,
)

varlen = pytest.importorskip("torch.nn.attention.varlen")
REAL = varlen.varlen_attn


def _row(heads: int = 4, kv_heads: int = 2, d: int = 16, cuts=(0, 5, 12, 20), dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    t = cuts[-1]
    q = torch.randn(1, heads, t, d, generator=g)
    k, v = (torch.randn(1, kv_heads, t, d, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor(cuts)


def _recorder(calls: list, signature_of=REAL):
    """Stands in for varlen_attn on the CPU: binds the call to `signature_of`'s signature (a TypeError there is
    what the GPU would raise), then computes causal attention per sample from what it was given."""

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(inspect.signature(signature_of).bind(q, k, v, cu_q, cu_k, max_q, max_k, **kw))
        assert kw.get("window_size", (-1, 0)) == (-1, 0) or kw.get("is_causal")
        cuts = cu_q.tolist()
        parts = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True,
                                                scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False))
                 for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        return torch.cat(parts, dim=1).transpose(0, 1)

    return fake


def test_our_varlen_call_binds_to_the_installed_signature(monkeypatch):
    """The exact arguments varlen_attention passes, bound to this torch's varlen_attn; its result is the per-sample
    sdpa's (so the transposes around the call are right too), and the call is counted as varlen."""
    calls: list = []
    monkeypatch.setattr(attention, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(attention, "_FEATURES", [varlen_features(REAL)])  # what this torch's function takes
    monkeypatch.setattr(varlen, "varlen_attn", _recorder(calls))
    q, k, v, cuts = _row(dtype=torch.bfloat16)
    attention_calls(reset=True)
    out, _ = varlen_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cuts)
    monkeypatch.undo()
    ref, _ = per_sample_sdpa(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cuts)
    assert len(calls) == 1
    bound = calls[0].arguments
    assert bound["enable_gqa"] is True and bound["window_size"] == (-1, 0) and bound["scale"] == 0.3
    torch.testing.assert_close(out, ref, atol=4e-3, rtol=1.6e-2)  # bf16, another memory layout: same values
    assert attention_calls() == {"varlen": 1, "sdpa per sample": 1}


def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
    """A varlen_attn without window_size, scale and enable_gqa (an older torch's spelling)."""


def ancient_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    """A varlen_attn that cannot be told to be causal."""


def test_features_come_from_the_signature():
    assert varlen_features() == {"window_size": True, "is_causal": False, "enable_gqa": True, "scale": True}
    old = varlen_features(old_varlen_attn)
    assert old == {"window_size": False, "is_causal": True, "enable_gqa": False, "scale": False}
    assert "enable_gqa" in varlen_problem(old, gqa=True) and varlen_problem(old, gqa=False) is None
    assert "no causal mask" in varlen_problem(varlen_features(ancient_varlen_attn), gqa=False)
    assert "has no torch.nn.attention.varlen" in varlen_problem(None, gqa=False)
    # the older spelling: causal through is_causal; the default scale can be left out, another one cannot
    assert varlen_kwargs(old, 0.25, 16, gqa=False) == {"is_causal": True}
    assert varlen_kwargs(old, 0.3, 16, gqa=False) is None
    assert varlen_kwargs(varlen_features(), 0.3, 16, gqa=True) == {"window_size": (-1, 0), "scale": 0.3,
                                                                     "enable_gqa": True}


def test_a_torch_without_enable_gqa_gets_per_sample_sdpa_with_the_reason(monkeypatch):
    problem = varlen_problem(varlen_features(old_varlen_attn), gqa=True)
    name, why = choose_padding_free_attention("sdpa", "cuda", torch.bfloat16, False, problem)
    assert name == NAME and "enable_gqa" in why
    assert choose_padding_free_attention("sdpa", "cuda", torch.bfloat16, False, None)[0] == VARLEN
    # forced onto the varlen path anyway (a model chosen before): it steps aside at the call, counted with the reason
    calls: list = []
    monkeypatch.setattr(attention, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(attention, "_FEATURES", [varlen_features(old_varlen_attn)])
    monkeypatch.setattr(varlen, "varlen_attn", _recorder(calls, old_varlen_attn))
    q, k, v, cuts = _row()
    attention_calls(reset=True)
    out, _ = varlen_attention(None, q, k, v, None, cu_seq_lens_q=cuts)
    assert calls == [] and out.dtype == torch.bfloat16
    assert attention_calls() == {"sdpa per sample (not varlen: varlen_attn has no enable_gqa (grouped-query "
                                 "attention))": 1}
    # without grouped-query attention the old spelling is called, and binds
    q, k, v, cuts = _row(kv_heads=4)
    varlen_attention(None, q, k, v, None, cu_seq_lens_q=cuts)
    assert len(calls) == 1 and calls[0].arguments["is_causal"] is True


def test_boundaries_are_read_from_position_ids_when_the_collator_passes_none(monkeypatch):
    """trl 1.13's padding-free collator passes position_ids alone: the varlen call gets the boundaries they hold."""
    calls: list = []
    monkeypatch.setattr(attention, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(attention, "_FEATURES", [varlen_features(REAL)])
    monkeypatch.setattr(varlen, "varlen_attn", _recorder(calls))
    q, k, v, cuts = _row()
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)])
    out, _ = varlen_attention(None, q, k, v, None, position_ids=positions[None])
    assert calls[0].arguments["cu_seq_q"].tolist() == cuts.tolist() and calls[0].arguments["max_q"] == 8
    monkeypatch.undo()
    ref, _ = per_sample_sdpa(None, q, k, v, None, cu_seq_lens_q=cuts)
    torch.testing.assert_close(out, ref, atol=4e-3, rtol=1.6e-2)
    one_sample = torch.arange(20)[None]  # positions that never restart: one sample, no packing to read
    assert attention.sample_cuts({"position_ids": one_sample}, 20) is None
