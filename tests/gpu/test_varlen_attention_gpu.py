"""On CUDA the padding-free rows' varlen attention (torch's flash-attention varlen kernel) equals per-sample sdpa,
forward and backward, in bf16 and fp16, with grouped-query heads and without; the counts of the attention paths say
whether torch's kernel really ran (an older torch without `enable_gqa` steps aside for grouped-query heads: skipped
with that reason, never passed by comparing the fallback with itself)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kv_heads", [2, 8], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_per_sample_sdpa(dtype, kv_heads):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("torch.nn.attention.varlen")
    from finetune.model.attention import (
        attention_calls,
        per_sample_sdpa,
        varlen_attention,
        varlen_features,
        varlen_problem,
    )

    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [300, 17, 1024, 129]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    total = int(bounds[-1])

    def leaf(heads):
        return torch.randn(1, heads, total, 64, device="cuda", generator=gen, dtype=dtype).requires_grad_()

    q, k, v = leaf(8), leaf(kv_heads), leaf(kv_heads)
    attention_calls(reset=True)
    kwargs = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths),
              "max_length_k": max(lengths)}
    outs, grads = [], []
    for fn in (varlen_attention, per_sample_sdpa):
        out, _ = fn(torch.nn.Module(), q, k, v, None, scaling=0.125, **kwargs)
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert (outs[0] - outs[1]).abs().max() <= tol * outs[1].abs().max()
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 2 * tol * b.abs().max()
    problem = varlen_problem(varlen_features(), gqa=kv_heads != 8)
    calls = attention_calls(reset=True)
    if problem is not None:
        assert calls.get(f"sdpa per sample (not varlen: {problem})") == 1, calls
        pytest.skip(f"torch {torch.__version__}: varlen did not run ({problem}); the fallback matched")
    assert calls.get("varlen") == 1, calls
