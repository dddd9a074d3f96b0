"""Long rows on the CPU: the per-sample attention of padding-free rows runs PyTorch's flash-attention CPU kernel (not
the math backend, which would keep a tokens x tokens score matrix per head), so what it keeps for backward grows
linearly with the row's length."""

from __future__ import annotations

import torch

from finetune.model.attention import attention_calls, per_sample_sdpa


def _kept(length: int, heads: int = 4, kv_heads: int = 2, dim: int = 32) -> tuple[int, str]:
    q = torch.randn(1, heads, length, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, length, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, length, dim, requires_grad=True)
    kept = 0

    def pack(t):
        nonlocal kept
        if not any(t is x for x in (q, k, v)):  # the inputs are the caller's anyway
            kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = per_sample_sdpa(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, length], dtype=torch.int32))
    node = out.grad_fn
    while node is not None and "Attention" not in type(node).__name__:  # past the transpose and copy
        node = node.next_functions[0][0]
    out.sum().backward()
    return kept, type(node).__name__ if node is not None else "none"


def test_per_sample_attention_memory_is_linear_in_length():
    attention_calls(reset=True)
    short, kernel = _kept(1024)
    long, _ = _kept(4096)
    assert "FlashAttentionForCpu" in kernel, kernel
    assert attention_calls() == {"sdpa per sample": 2}
    # linear: 4x the tokens, 4x the bytes kept (quadratic would be 16x; one 4096 x 4096 score matrix per head
    # alone would be 256 MB)
    assert 3.5 * short <= long <= 4.5 * short, (short, long)
    assert long < 4 * 4096 * 4096
