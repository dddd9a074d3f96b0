"""A tiny model with a trained-looking LoRA adapter, and its loss and gradients: what the tests of memory-saving
paths (tiled MLP, lean saves) compare against the plain path."""

from __future__ import annotations

import torch

from finetune.model.adapters import attach
from finetune.recipe.schema import LoraConfig


def frozen(model_dir, **kwargs):
    """The model in `model_dir` in float32, every weight frozen (`kwargs`: more `from_pretrained` arguments)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    base.requires_grad_(False)
    return base


def adapted(model_dir, dropout: float = 0.0, checkpointing: bool = False):
    """The model in `model_dir` (float32, sdpa) with LoRA r 4 on every projection, B nonzero so that every LoRA
    weight gets a gradient, in training mode; `checkpointing`: non-reentrant gradient checkpointing on."""
    torch.manual_seed(0)
    base = frozen(model_dir, attn_implementation="sdpa")
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = attach(base, LoraConfig(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    return model


def loss_and_grads(model, ids, seed=1):
    """Loss and the adapter's gradients for `ids` as labels (`seed`: the LoRA dropout masks)."""
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads
