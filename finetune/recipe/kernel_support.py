"""Which fused kernels can run on which model and adapter: checked by `ft validate` (no torch) and at train start.

`ft validate` reads the model's `config.json` (a local folder, or the Hub cache) for its `model_type`; the stage
checks the loaded model again before patching it (`finetune.model.kernels`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
KERNEL_FIELDS = ("lora_linear", "lora_mlp", "lora_qkvo", "fused_ce", "rmsnorm", "rope")
_LORA_KERNELS = ("lora_linear", "lora_mlp", "lora_qkvo")


def _get(cfg: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """Reads the first present attribute (or dict key) of `names`."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def check_kernel_support(model_type: str, lora_cfg: Any, kernels_cfg: Any = None) -> list[str]:
    """Returns the reasons the requested kernels cannot run on this model/adapter (empty when all is fine).

    Args:
        model_type: `config.model_type` of the base model (e.g. `"llama"`).
        lora_cfg: The LoRA settings (any object or dict with peft-like names: `use_dora`, `lora_bias`,
            `fan_in_fan_out`, `target_modules`); None when there is no adapter.
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
    errors += _dropout_problems(enabled, lora_cfg)
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


def _dropout_problems(enabled: list[str], lora_cfg: Any) -> list[str]:
    """The fused LoRA blocks have no dropout: with it they would fall back in every training step, silently."""
    fused = [f for f in ("lora_mlp", "lora_qkvo") if f in enabled]
    dropout = _get(lora_cfg, ("dropout", "lora_dropout"), 0.0) or 0.0
    if not fused or dropout <= 0:
        return []
    return [f"kernels ({', '.join(fused)}): the fused LoRA blocks have no dropout, so with lora.dropout {dropout} "
            "they would fall back to per-projection ops in every training step; set lora.dropout: 0 or turn "
            f"{' and '.join(fused)} off (lora_linear supports dropout)."]


def model_type_of(name_or_path: str, revision: str | None = None) -> str | None:
    """`model_type` from the model's config.json (local folder or Hub cache), without loading transformers; None
    when it cannot be read offline."""
    config = Path(name_or_path) / "config.json"
    if not config.exists():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            return None
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def recipe_kernel_problems(recipe: Any) -> list[str]:
    """The reasons the recipe's `kernels:` cannot run on its model and LoRA settings (empty: fine or unknown)."""
    if not recipe.kernels.enabled():
        return []
    from finetune.recipe.gguf_source import gguf_model_type

    model_type = gguf_model_type(recipe.model) or model_type_of(recipe.model.name_or_path, recipe.model.revision)
    if model_type is None:  # the model is checked at train start, once loaded; the adapter settings now
        enabled = [f for f in KERNEL_FIELDS if getattr(recipe.kernels, f, False)]
        return [f"kernels: {p}" for p in _dropout_problems(enabled, recipe.lora)]
    return [f"kernels: {p}" for p in check_kernel_support(model_type, recipe.lora, recipe.kernels)]
