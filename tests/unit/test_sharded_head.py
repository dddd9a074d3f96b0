"""The loss heads read the LM head's weight directly: a sharded (FSDP2 DTensor) or empty (DeepSpeed ZeRO-3) weight is
gathered first, as trl's fused head does, and the loss and gradients are those of the unsharded model."""

from __future__ import annotations

import contextlib

import pytest
import torch

from finetune.model import loss_heads
from finetune.model.loss_heads import install, install_compact_fused_head


def _model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.requires_grad_(False)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _sft_and_dpo(model):
    """SFT's label loss with its LoRA gradients, and DPO's per-token log-probs through both kernels."""
    install(model)
    install_compact_fused_head(model, chunked_ce=False)
    loss = model(**_batch(), label_positions_loss=True).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    lm = model.get_base_model()
    dpo = []
    for chunked in (False, True):
        lm._ft_compact_head = False
        install_compact_fused_head(model, chunked_ce=chunked)  # wraps the last one: the outermost decides
        dpo.append(model(**_batch(), fused_lm_head=True).log_probs.detach())
    return loss.detach(), grads, dpo


def _assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    for g, r in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_sharded_head_is_gathered(tiny_model, process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    ref = _sft_and_dpo(_model(tiny_model))
    model = _model(tiny_model)
    head = model.get_base_model().get_output_embeddings()
    mesh = init_device_mesh("cpu", (1,))
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
    assert isinstance(head.weight, DTensor) and loss_heads.unsupported_reason(model) is None
    _assert_same(_sft_and_dpo(model), ref)


def test_zero3_empty_head_is_gathered(tiny_model, monkeypatch):
    """ZeRO-3 keeps a parameter empty outside its module's forward; trl's gather context (faked here: no deepspeed on
    this machine) fills it for the block. The heads must read the weight, and its vocabulary size, only inside it."""
    from trl.trainer import utils as trl_utils

    ref = _sft_and_dpo(_model(tiny_model))
    model = _model(tiny_model)
    weight = model.get_base_model().get_output_embeddings().weight
    full = weight.data.clone()
    weight.data = torch.empty(0)
    gathered = []

    @contextlib.contextmanager
    def fake_gather(*params):
        assert any(p is weight for p in params)
        weight.data = full
        gathered.append(1)
        try:
            yield
        finally:
            weight.data = torch.empty(0)

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", fake_gather)
    _assert_same(_sft_and_dpo(model), ref)
    assert len(gathered) == 3  # SFT's loss, DPO's trl and chunked kernels: one gather each, none in the backward
    assert weight.numel() == 0
