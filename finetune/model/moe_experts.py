"""4-bit NF4 Mixture-of-Experts experts: their storage and their forward (issue 30; `quantization.experts`).

bitsandbytes quantizes `nn.Linear` layers only, and transformers 5 keeps the experts of Qwen3-MoE, Qwen2-MoE, Mixtral
and OLMoE as fused 3D parameters ([experts, 2 x expert size, hidden] and [experts, hidden, expert size]), most of such
a model's weight. `quantize_experts` replaces each by `NF4Experts`: every expert's 2D weight quantized on its own by
bitsandbytes' `quantize_4bit` (NF4, blocks of 64, the block scales quantized again as the dense layers' are). The
forward is registered with transformers' experts interface (`ALL_EXPERTS_FUNCTIONS`) under `NF4_FORWARD` and chosen
through the model's own config, so the model's MoE block, router and layer stay transformers' own: tokens are grouped
by the expert they are routed to, and only the routed experts' weights go through bitsandbytes' `matmul_4bit`, which
dequantizes them for the matmul and again in the backward (no dequantized expert is kept). The experts stay frozen;
the same forward runs plain experts too, and adds the expert adapters of `finetune.model.expert_adapters` inside each
expert (`lora.experts: shared`, or `per_expert` on 4-bit experts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NF4_FORWARD = "finetune_experts"  # our experts forward (4-bit or plain experts, with or without expert adapters)
BLOCK = 64
ADAPTERS = "expert_lora"  # an experts module's ModuleDict of expert adapters (finetune.model.expert_adapters)


class NF4Experts(nn.Module):
    """One fused expert weight [experts, out, in] stored as NF4, one bitsandbytes quant state per expert."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool = True,
                 quant_type: str = "nf4"):
        import bitsandbytes.functional as F

        super().__init__()
        self.shape = tuple(weight.shape)
        self.compute_dtype = compute_dtype
        packed, self.states = [], []
        for expert in weight.detach():
            q, state = F.quantize_4bit(expert.contiguous(), blocksize=BLOCK, compress_statistics=double_quant,
                                       quant_type=quant_type)
            packed.append(q)
            self.states.append(state)
        self.register_buffer("packed", torch.stack(packed))

    def linear(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x @ W[expert].T, W dequantized inside bitsandbytes' matmul (and again in its backward)."""
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x.to(self.compute_dtype), self.packed[expert].t(), quant_state=self.states[expert])

    def dequantize(self) -> torch.Tensor:
        """Every expert's weight, dequantized: [experts, out, in] (the reference the forward is checked against)."""
        import bitsandbytes.functional as F

        return torch.stack([F.dequantize_4bit(q, s) for q, s in zip(self.packed, self.states, strict=True)])

    def numel(self) -> int:
        """The weights it stands for (counted as the dense layers' 4-bit weights are: by their logical size)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def _linear(weight: Any, x: torch.Tensor, expert: int) -> torch.Tensor:
    """x @ W[expert].T for a 4-bit (`NF4Experts`) or a plain fused weight."""
    if isinstance(weight, NF4Experts):
        return weight.linear(x, expert)
    return torch.nn.functional.linear(x, weight[expert])


def experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward signature, over `NF4Experts` or plain weights: tokens grouped by routed expert;
    the expert adapters of `finetune.model.expert_adapters` (when the module holds them) added to each expert's
    gate/up and down outputs, before the activation and before the routing weight."""
    adapters = getattr(self, ADAPTERS, None) or {}
    gate_up_lora, down_lora = (adapters[n] if n in adapters and adapters[n].enabled else None
                               for n in ("gate_up_proj", "down_proj"))
    out = torch.zeros_like(hidden_states)
    k = top_k_index.shape[-1]
    experts = self.gate_up_proj.shape[0]
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=experts + 1).tolist()
    weights = top_k_weights.reshape(-1)
    start = 0
    for expert, n in enumerate(counts):
        pairs, start = order[start:start + n], start + n
        if n == 0 or expert >= experts:  # index == experts: a slot routed nowhere (transformers')
            continue
        tokens = pairs // k
        x = hidden_states[tokens]
        gate_up = _linear(self.gate_up_proj, x, expert)
        if gate_up_lora is not None:
            gate_up = gate_up + gate_up_lora(x, expert).to(gate_up.dtype)
        h = self._apply_gate(gate_up)
        y = _linear(self.down_proj, h, expert)
        if down_lora is not None:
            y = y + down_lora(h, expert).to(y.dtype)
        y = y * weights[pairs, None].to(h.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def select_own_forward(model: Any) -> None:
    """Register `experts_forward` with transformers' experts interface and choose it through the model's config (the
    one before is kept for `plain_experts_implementation`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NF4_FORWARD, experts_forward)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "_experts_implementation", None) != NF4_FORWARD:
            cfg._experts_before_nf4 = getattr(cfg, "_experts_implementation", None)
            cfg._experts_implementation = NF4_FORWARD


def quantize_experts(model: Any, expert_parameters: tuple[str, ...], compute_dtype: torch.dtype,
                     double_quant: bool = True) -> int:
    """Replace the fused expert weights named `expert_parameters` (paths inside a layer, e.g.
    `mlp.experts.gate_up_proj`) by `NF4Experts` in every layer and select `experts_forward`. Returns the count."""
    done = 0
    for name, module in list(model.named_modules()):
        for path in expert_parameters:
            owner, _, attr = path.rpartition(".")
            if not name.endswith("." + owner):
                continue
            weight = module._parameters.get(attr)
            if weight is None or weight.dim() != 3:
                continue
            del module._parameters[attr]
            setattr(module, attr, NF4Experts(weight, compute_dtype, double_quant))
            done += 1
    if done:
        select_own_forward(model)
    return done


def quantized_expert_numel(model: Any) -> int:
    """Weights held as `NF4Experts` in `model` (by their logical size)."""
    return sum(m.numel() for m in model.modules() if isinstance(m, NF4Experts))


def plain_experts_implementation(config: Any) -> None:
    """Undo `quantize_experts`' choice of forward on a copy of the config (a plain model saved or built from it)."""
    for cfg in (config, getattr(config, "get_text_config", lambda: config)()):
        if getattr(cfg, "_experts_implementation", None) == NF4_FORWARD:
            cfg._experts_implementation = getattr(cfg, "_experts_before_nf4", None)
