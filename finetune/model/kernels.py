"""Patches a loaded (peft-wrapped) Llama/Qwen2/Mistral model instance with the fused kernels.

Only the loaded model's module *instances* are touched (their `forward` is rebound with
`types.MethodType`); transformers' and peft's classes stay as they are, so other models in the process are
unaffected. Every patched forward checks, call by call, that its fast path applies and otherwise calls the
original forward, so the patched model stays correct when, e.g., adapters are disabled (DPO's reference pass
with `disable_adapter()`), merged, several are active, DoRA is used, or LoRA dropout is active in training
(:func:`lora_linear` handles dropout; the fused MLP/QKV blocks then fall back to per-projection ops).

`fused_ce` patches nothing here: the `*ForCausalLM.forward` has one owner, the loss head of
`finetune.model.loss_heads`, which computes SFT's loss with the chunked cross-entropy always and DPO's log-probs
with it when `fused_ce` is on (`finetune.model.patches.apply_patches` installs and records it). Module patches
here are applied through `apply_patches` as well.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

from finetune.kernels import hf_forwards as hf
from finetune.recipe.kernel_support import KERNEL_FIELDS, SUPPORTED_MODEL_TYPES, check_kernel_support

__all__ = ["KERNEL_FIELDS", "SUPPORTED_MODEL_TYPES", "apply_kernels", "check_kernel_support"]


def _causal_lm(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` inside a `PeftModel` (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "lm_head") and hasattr(getattr(inner, "model", None), "layers")):
        raise TypeError(f"expected a *ForCausalLM with .model.layers and .lm_head, got {type(inner).__name__}")
    return inner


def _patch(module: nn.Module, fn: Callable[..., Any]) -> bool:
    """Rebinds `module.forward` to `fn` (keeping the original); False if already patched."""
    if hasattr(module, hf.ORIG):
        return False
    setattr(module, hf.ORIG, module.forward)
    module.forward = types.MethodType(fn, module)
    return True


def apply_kernels(model: nn.Module, kernels_cfg: Any) -> list[str]:
    """Patches the loaded model instance with the kernels switched on in `kernels_cfg`.

    Args:
        model: A loaded Llama/Qwen2/Mistral `*ForCausalLM`, usually wrapped by peft.
        kernels_cfg: Object with boolean attributes named as in :data:`KERNEL_FIELDS`.

    Returns:
        One line per patched kernel saying what was patched.

    Raises:
        ValueError: If kernels are requested for an unsupported architecture.
    """
    on = {f: bool(getattr(kernels_cfg, f, False)) for f in KERNEL_FIELDS if f != "fused_ce"}
    if not any(on.values()):
        return []
    lm = _causal_lm(model)
    model_type = getattr(lm.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(check_kernel_support(model_type, None, kernels_cfg)[0])
    layers = list(lm.model.layers)
    report: list[str] = []
    if on["rmsnorm"]:
        norms = [
            m for m in lm.model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
        ]
        n = sum(_patch(m, hf.rmsnorm_forward) for m in norms)
        report.append(f"rmsnorm: {n} RMSNorm modules use the fused RMSNorm")
    if on["rope"] or on["lora_qkvo"]:
        for layer in layers:
            layer.self_attn._finetune_attention = (on["lora_qkvo"], on["rope"], model_type)
            _patch(layer.self_attn, hf.attention_forward)
        if on["rope"]:
            report.append(f"rope: {len(layers)} attention modules apply the fused rotary embedding")
        if on["lora_qkvo"]:
            report.append(f"lora_qkvo: {len(layers)} attention modules run Q/K/V as one fused LoRA op")
    if on["lora_mlp"]:
        n = sum(_patch(layer.mlp, hf.mlp_forward) for layer in layers)
        report.append(f"lora_mlp: {n} MLP modules use the fused LoRA SwiGLU MLP")
    if on["lora_linear"] or on["lora_qkvo"]:
        scope = [lm] if on["lora_linear"] else [layer.self_attn.o_proj for layer in layers]
        loras = [m for root in scope for m in root.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        n = sum(_patch(m, hf.lora_linear_forward) for m in loras)
        where = "LoRA linear layers" if on["lora_linear"] else "o_proj LoRA layers (lora_qkvo)"
        report.append(f"lora_linear: {n} {where} use the fused (NF4) LoRA linear op")
    return report
