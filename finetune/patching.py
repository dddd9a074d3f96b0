"""Patches a loaded (peft-wrapped) Llama/Qwen2/Mistral model instance with the fused kernels.

Only the loaded model's module *instances* are touched (their ``forward`` is rebound with
``types.MethodType``); transformers' and peft's classes stay as they are, so other models in the process are
unaffected. Every patched forward checks, call by call, that its fast path applies and otherwise calls the
original forward, so the patched model stays correct when, e.g., adapters are disabled (DPO's reference pass
with ``disable_adapter()``), merged, several are active, DoRA is used, or LoRA dropout is active in training
(:func:`lora_linear` handles dropout; the fused MLP/QKV blocks then fall back to per-projection ops).

``fused_ce``: with ``labels``, the ``*ForCausalLM`` forward runs the backbone and the chunked loss on the hidden
states, and returns ``logits=None``: the full ``[batch, seq, vocab]`` logits never exist. Without labels it is
the original forward (logits as usual). DPO needs per-sequence log-probs rather than a loss:
:func:`sequence_logps` computes them through the same chunked path. trl's own trainers (1.16) already score
with a chunked ``fused_lm_head=True`` forward of their own, which this patch leaves alone and passes through.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finetune.kernels import hf_forwards as hf
from finetune.kernels.cross_entropy import sequence_logprobs

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
KERNEL_FIELDS = ("lora_linear", "lora_mlp", "lora_qkvo", "fused_ce", "rmsnorm", "rope")
_LORA_KERNELS = ("lora_linear", "lora_mlp", "lora_qkvo")


def _get(cfg: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """Reads the first present attribute (or dict key) of ``names``."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def check_kernel_support(model_type: str, lora_cfg: Any, kernels_cfg: Any = None) -> list[str]:
    """Returns the reasons the requested kernels cannot run on this model/adapter (empty when all is fine).

    Args:
        model_type: ``config.model_type`` of the base model (e.g. ``"llama"``).
        lora_cfg: The LoRA settings (any object or dict with peft-like names: ``use_dora``, ``lora_bias``,
            ``fan_in_fan_out``, ``target_modules``); None when there is no adapter.
        kernels_cfg: Object with the boolean fields of :data:`KERNEL_FIELDS`; None checks as if all were on.

    Returns:
        Human-readable error messages.
    """
    enabled = [f for f in KERNEL_FIELDS if kernels_cfg is None or bool(getattr(kernels_cfg, f, False))]
    if not enabled:
        return []
    errors: list[str] = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        errors.append(
            f"kernels ({', '.join(enabled)}): model_type {model_type!r} is not supported; the fused kernels "
            f"support {', '.join(SUPPORTED_MODEL_TYPES)}. Turn the kernels off for this model."
        )
    lora_on = [f for f in enabled if f in _LORA_KERNELS]
    if lora_on and lora_cfg is None and kernels_cfg is not None:
        errors.append(f"kernels ({', '.join(lora_on)}) need a LoRA adapter; there is none. Turn them off.")
    if lora_cfg is None:
        return errors
    if lora_on and _get(lora_cfg, ("use_dora", "dora"), False):
        errors.append(
            f"kernels ({', '.join(lora_on)}): DoRA (use_dora) is not supported by the fused LoRA kernels; "
            "set use_dora: false or turn those kernels off."
        )
    if lora_on and _get(lora_cfg, ("lora_bias",), False):
        errors.append(f"kernels ({', '.join(lora_on)}): lora_bias=True (a bias on lora_B) is not supported.")
    if lora_on and _get(lora_cfg, ("fan_in_fan_out",), False):
        errors.append(f"kernels ({', '.join(lora_on)}): fan_in_fan_out=True (Conv1D weights) is not supported.")
    targets = _get(lora_cfg, ("target_modules", "targets"), ()) or ()
    targets = [targets] if isinstance(targets, str) else list(targets)
    if "fused_ce" in enabled and "lm_head" in targets:
        errors.append(
            "kernels.fused_ce: a LoRA adapter on lm_head is not supported (the chunked loss reads "
            "lm_head.weight directly); remove lm_head from target_modules or turn fused_ce off."
        )
    return errors


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a ``PeftModel`` (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "lm_head") and hasattr(getattr(inner, "model", None), "layers")):
        raise TypeError(f"expected a *ForCausalLM with .model.layers and .lm_head, got {type(inner).__name__}")
    return inner


def _patch(module: nn.Module, fn: Callable[..., Any]) -> bool:
    """Rebinds ``module.forward`` to ``fn`` (keeping the original); False if already patched."""
    if hasattr(module, hf.ORIG):
        return False
    setattr(module, hf.ORIG, module.forward)
    module.forward = types.MethodType(fn, module)
    return True


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Sum of ``log p(labels[t] | prefix)`` per sequence without the full logits (for DPO).

    Args:
        model: The (peft-wrapped) causal LM, patched or not.
        input_ids: ``[B, S]`` token ids.
        labels: ``[B, S]`` unshifted labels, -100 where not scored (prompt, padding).
        attention_mask: Optional ``[B, S]`` mask.
        **kwargs: Extra backbone arguments.

    Returns:
        float32 ``[B]`` log-probabilities, differentiable w.r.t. the adapter.
    """
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    return sequence_logprobs(hidden[:, :-1], head.weight, labels[:, 1:].to(hidden.device), head.bias)


def apply_kernels(model: nn.Module, kernels_cfg: Any) -> list[str]:
    """Patches the loaded model instance with the kernels switched on in ``kernels_cfg``.

    Args:
        model: A loaded Llama/Qwen2/Mistral ``*ForCausalLM``, usually wrapped by peft.
        kernels_cfg: Object with boolean attributes named as in :data:`KERNEL_FIELDS`.

    Returns:
        One line per patched kernel saying what was patched.

    Raises:
        ValueError: If kernels are requested for an unsupported architecture.
    """
    on = {f: bool(getattr(kernels_cfg, f, False)) for f in KERNEL_FIELDS}
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
    if on["fused_ce"]:
        _patch(lm, hf.causal_lm_forward)
        report.append(
            f"fused_ce: {type(lm).__name__}.forward computes the loss with the chunked CE (logits=None "
            "when labels are given)"
        )
    return report
