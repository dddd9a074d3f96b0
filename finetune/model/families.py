"""What differs per model family, as data: one row per transformers `model_type`, read from config.json alone.

Stages and exports ask this table instead of testing `model_type` themselves. Families not listed have nothing here
that matters (GPT-2's Conv1D layers are found by their class: `finetune.export.merge.to_conv1d_layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.recipe.schema import LoraConfig, ModelConfig, Recipe


@dataclass(frozen=True)
class Traits:
    """How a family's weights are laid out where that matters after training."""

    # MoE experts as fused 3D parameters (transformers 5), by their names inside the layer; peft adapts them as raw
    # parameters (`target_parameters`), which only peft's own merge into the original weights knows
    expert_parameters: tuple[str, ...] = ()
    # the router's weight (a raw parameter of a router module that is not an nn.Linear in transformers 5)
    router_parameter: str | None = None

    @property
    def fused_experts(self) -> bool:
        return bool(self.expert_parameters)


_FUSED = Traits(expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                router_parameter="mlp.gate.weight")
TRAITS: dict[str, Traits] = {"qwen3_moe": _FUSED, "qwen2_moe": _FUSED, "mixtral": _FUSED, "olmoe": _FUSED}


def traits(model_type: str | None) -> Traits:
    """The family's row (a plain Linear-layer decoder when not listed)."""
    return TRAITS.get(model_type or "", Traits())


def raw_parameter_adapters(kind: str | None, lora: LoraConfig) -> bool:
    """Whether `lora` puts adapters on raw parameters of this family (its fused experts or its router)."""
    row = traits(kind)
    return row.fused_experts and (lora.experts != "none" or (lora.router and row.router_parameter is not None))


def dequantized_merge_refusal(kind: str | None, quantized: bool, lora: LoraConfig) -> str | None:
    """Why a merged export into the dequantized 4-bit weights (the QLoRA default, and what `hub.format: merged`
    uploads) cannot be made for this recipe, or None when it can."""
    if not (quantized and raw_parameter_adapters(kind, lora)):
        return None
    on = "the experts (lora.experts: per_expert)" if lora.experts != "none" else "the router (lora.router: true)"
    return f"LoRA on {on} adapts raw 3D parameters, which only peft's merge into the original weights knows"


def hub_problems(recipe: Recipe) -> list[str]:
    """An upload of a merged model (`hub.format: merged`, merged into the dequantized 4-bit weights) that this run's
    adapter could never make, said before training instead of after it."""
    if not recipe.hub.repo_id or recipe.hub.format != "merged":
        return []
    why = dequantized_merge_refusal(model_type(recipe.model), recipe.quantization.mode != "none", recipe.lora)
    if why is None:
        return []
    return [f"hub.format: merged cannot be made for this run: {why}, and the upload merges into the dequantized "
            "4-bit weights; set hub.format: adapter, or lora.experts: none and lora.router: false"]


def model_type(cfg: ModelConfig) -> str | None:
    """The base model's `model_type` from its config.json (local, or in the Hub cache), without loading anything;
    None when neither is at hand. A GGUF base: from the file's header."""
    from finetune.recipe.gguf_source import gguf_model_type, gguf_path

    if gguf_path(cfg) is not None:
        return gguf_model_type(cfg)
    path = Path(cfg.name_or_path) / "config.json"
    if not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.name_or_path, "config.json", revision=cfg.revision)
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
