"""Per-sample attention reads the sample bounds from the device once per batch, not once per layer."""

from __future__ import annotations

import torch
from tinymodels import build_char_model
from transformers import AutoModelForCausalLM

from finetune.model.attention import use_per_sample_attention


def test_bounds_are_read_once_per_forward(tmp_path, monkeypatch):
    folder = build_char_model(tmp_path / "m", hidden=32, layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    assert use_per_sample_attention(model)
    reads: list[int] = []
    tolist = torch.Tensor.tolist

    def counted(self):
        if self.dtype == torch.int32:
            reads.append(self.numel())
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def batch(lengths: list[int]) -> dict:
        ids = torch.randint(5, 60, (1, sum(lengths)), generator=torch.Generator().manual_seed(len(lengths)))
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                "max_length_q": max(lengths), "max_length_k": max(lengths)}

    first = batch([5, 9, 4])
    reads.clear()
    model(**first)
    assert reads == [4]  # one read of the 4 bounds for the three layers
    model(**first)  # the same batch again (gradient checkpointing's recompute): nothing read
    assert reads == [4]
    model(**batch([7, 3]))  # a new batch brings new bounds: read once more
    assert reads == [4, 3]
