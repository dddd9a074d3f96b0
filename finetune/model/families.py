"""What differs per model family, as data: one row per transformers `model_type`, read from config.json alone.

Stages and exports ask this table instead of testing `model_type` themselves. Families not listed have nothing here
that matters (GPT-2's Conv1D layers are found by their class: `finetune.export.merge.to_conv1d_layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.recipe.schema import ModelConfig, Recipe


@dataclass(frozen=True)
class Traits:
    """How a family's weights are laid out where that matters after training."""

    # MoE experts as fused 3D parameters (transformers 5), by their names inside the layer; peft adapts them as raw
    # parameters (`target_parameters`), bitsandbytes does not quantize them (`finetune.model.moe_experts` does)
    expert_parameters: tuple[str, ...] = ()
    # the router's weight (a raw parameter of a router module that is not an nn.Linear in transformers 5)
    router_parameter: str | None = None
    # peft 0.21 rewrites adapter targets named like transformers 4's experts (gate_proj, up_proj, down_proj, w1-w3,
    # gate) into LoRA on the fused experts, whatever module they name (its v4 -> v5 conversion of this family)
    peft_moves_mlp_names: bool = False

    @property
    def fused_experts(self) -> bool:
        return bool(self.expert_parameters)


_FUSED = {"expert_parameters": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
          "router_parameter": "mlp.gate.weight"}
TRAITS: dict[str, Traits] = {
    "qwen3_moe": Traits(**_FUSED, peft_moves_mlp_names=True),
    "qwen2_moe": Traits(**_FUSED),  # its shared expert's gate_proj/up_proj/down_proj stay what they are
    "mixtral": Traits(**_FUSED, peft_moves_mlp_names=True),
    "olmoe": Traits(**_FUSED, peft_moves_mlp_names=True),
}


def traits(model_type: str | None) -> Traits:
    """The family's row (a plain Linear-layer decoder when not listed)."""
    return TRAITS.get(model_type or "", Traits())


def experts_note(recipe: Recipe) -> str:
    """What a QLoRA recipe does with a Mixture-of-Experts base's experts, for the model card ('' for dense models)."""
    if not traits(model_type(recipe.model)).fused_experts:
        return ""
    if recipe.quantization.experts:
        return ", the experts in NF4 too: finetune's quantization.experts"
    return ", the experts unquantized: bitsandbytes quantizes linear layers only"


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
