"""Replacement `forward` methods for transformers/peft module instances (bound by `finetune.model.kernels`).

Each one checks, on every call, that its fast path applies (adapter active and unmerged, a single adapter, no
DoRA or LoRA bias, a plain or NF4 base layer, ...) and otherwise calls the module's original forward, stored
under :data:`ORIG`. `lora_linear_forward` supports LoRA dropout (peft's convention, same RNG call order);
the fused MLP and Q/K/V paths require it to be inactive and fall back to per-projection calls otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from finetune.kernels.lora_linear import LoRAParams, lora_linear
from finetune.kernels.lora_mlp import lora_mlp
from finetune.kernels.lora_qkvo import lora_qkv
from finetune.kernels.nf4 import nf4_weight_of
from finetune.kernels.rmsnorm import rms_norm
from finetune.kernels.rope import apply_rope

#: Attribute under which a patched module keeps its original bound `forward`.
ORIG = "_finetune_orig_forward"


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


def _lora_of(module: nn.Module, x: torch.Tensor) -> tuple[LoRAParams, nn.Module] | None:
    """The fast-path parameters of a peft LoRA linear layer for this call, or None to use its own forward."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or getattr(module, "disable_adapters", True) or getattr(module, "merged", True):
        return None
    active = [a for a in module.active_adapters if a in lora_a]
    if len(active) != 1:
        return None
    name = active[0]
    if module.use_dora.get(name) or name in getattr(module, "lora_variant", {}):
        return None
    if getattr(module, "lora_bias", {}).get(name) or not isinstance(module.lora_A[name], nn.Linear):
        return None
    base = module.get_base_layer()
    if type(base) is nn.Linear:
        weight = base.weight
        if weight.requires_grad:
            return None
    else:
        weight = nf4_weight_of(base)
        compute = getattr(base, "compute_dtype", None)
        if weight is None or (x.dtype == torch.float16 and compute not in (None, torch.float16)):
            return None
    params = LoRAParams(weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], base.bias)
    return params, module.lora_dropout[name]


def lora_linear_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    got = None if args or kwargs else _lora_of(self, x)
    if got is None:
        return getattr(self, ORIG)(x, *args, **kwargs)
    p, dropout = got
    x_lora = dropout(x) if _dropout_active(dropout) else None
    return lora_linear(x, p.weight, p.a, p.b, p.scale, p.bias, x_lora)


def _fused_params(x: torch.Tensor, modules: list[nn.Module]) -> list[LoRAParams] | None:
    """Parameters for a fused multi-projection op, or None if any projection needs its own forward."""
    out = []
    for module in modules:
        got = _lora_of(module, x)
        if got is None or _dropout_active(got[1]):
            return None
        out.append(got[0])
    return out


def mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = _fused_params(x, [self.gate_proj, self.up_proj, self.down_proj])
    if params is None or getattr(self.config, "hidden_act", None) not in ("silu", "swish"):
        return getattr(self, ORIG)(x)
    return lora_mlp(x, *params)


def rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' Llama/Qwen2/Mistral attention forward with fused Q/K/V and/or RoPE."""
    use_qkv, use_rope, model_type = self._finetune_attention
    mod = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    projections = [self.q_proj, self.k_proj, self.v_proj]
    params = _fused_params(hidden_states, projections) if use_qkv else None
    if params is not None:
        q, k, v = lora_qkv(hidden_states, *params)
    else:
        q, k, v = (proj(hidden_states) for proj in projections)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    if use_rope:
        q, k = apply_rope(q, k, cos, sin)
    else:
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, mod.eager_attention_forward)
    extra: dict[str, Any] = {}
    if model_type == "qwen2":
        extra["sliding_window"] = self.sliding_window
    elif model_type == "mistral":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    attn_output, attn_weights = interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights
