"""Which transformers architectures become which llama.cpp architectures, and what changes on the way.

The tensor names come from the `gguf` package (`gguf.get_tensor_name_map`); this module holds only what that map
does not know: the hyperparameters llama.cpp reads for each architecture, and the few weights stored differently
(Llama and Mistral keep q/k rows in the rotate-half order of transformers, llama.cpp's `llama` graph wants each
head's two halves interleaved; Gemma stores RMSNorm weights as `w` for a `(1 + w)` scale, llama.cpp wants `1 + w`;
transformers 5 fuses each MoE layer's expert gate and up projections into one [experts, 2 x expert size, hidden]
parameter, llama.cpp reads them as two stacked 3D tensors).
Everything here reads a transformers config and is cheap, so `ft export` checks a model before loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Arch:
    """How one transformers `model_type` is written for llama.cpp."""

    gguf: str  # llama.cpp's architecture name (the `gguf` package's MODEL_ARCH_NAMES value)
    permute_qk: bool = False  # rotate-half q/k rows -> interleaved pairs (llama.cpp `llama` rope)
    norm_plus_one: bool = False  # RMSNorm weight w scales by (1 + w) in transformers
    expert_count: str | None = None  # Mixture of Experts: the config field holding the number of experts
    expert_size: str | None = None  # the config field of one expert's intermediate size, where it has its own


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),  # llama.cpp runs Mistral 7B as a llama
    "mixtral": Arch("llama", permute_qk=True, expert_count="num_local_experts"),  # a llama with experts there too
    "qwen3_moe": Arch("qwen3moe", expert_count="num_experts", expert_size="moe_intermediate_size"),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma2": Arch("gemma2", norm_plus_one=True),
    "phi3": Arch("phi3"),
    "olmo2": Arch("olmo2"),
    "gemma3_text": Arch("gemma3", norm_plus_one=True),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _rope(config: Any) -> dict[str, Any]:
    """The rope settings of a config, whether transformers keeps them in `rope_parameters` or the older fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers' rope is the
        params = {**params, **params["full_attention"]}  # model's; llama.cpp gives the sliding ones its own base
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def arch_of(config: Any, where: str) -> Arch:
    """The architecture entry for `config`, or a clear refusal naming what is supported."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        raise FinetuneError(
            f"{where}: GGUF export does not know the architecture '{model_type}' (supported: "
            f"{', '.join(sorted(ARCHS))}). Export with --format merged and convert that folder with llama.cpp's "
            "own tools if it supports the model."
        )
    problem = experts_problem(config)
    if problem:
        raise FinetuneError(f"{where}: GGUF export cannot write this {model_type} model: {problem}. Export with "
                            "--format merged instead")
    rope = _rope(config)
    if rope["rope_type"] not in ROPE_TYPES or (rope["rope_type"] == "longrope" and model_type != "phi3"):
        raise FinetuneError(f"{where}: rope type '{rope['rope_type']}' of this {model_type} model has no GGUF "
                            f"mapping here (supported: {', '.join(ROPE_TYPES)}; longrope for phi3 only)")
    return arch


def experts_problem(config: Any) -> str | None:
    """Why llama.cpp would compute this Mixture-of-Experts model differently from transformers (None: it would not).

    llama.cpp's `qwen3moe` graph always renormalises the chosen experts' weights to sum to 1 and puts experts in every
    layer; transformers follows `norm_topk_prob`, `mlp_only_layers` and `decoder_sparse_step`. (Mixtral always
    renormalises, in both.)
    """
    if getattr(config, "model_type", None) != "qwen3_moe":
        return None
    if not getattr(config, "norm_topk_prob", False):
        return ("its router does not renormalise the top-k expert weights (norm_topk_prob: false), "
                "which llama.cpp's qwen3moe always does")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return ("some of its layers have a dense MLP instead of experts (mlp_only_layers, decoder_sparse_step), "
                "llama.cpp's qwen3moe has experts in every layer")
    return None


def head_dim(config: Any) -> int:
    """Size of one attention head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer: Any, config: Any) -> None:
    """Everything llama.cpp reads about the model's shape, attention and rope, under the architecture's keys."""
    import gguf

    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    arch = ARCHS[config.model_type]
    if arch.expert_count:
        writer.add_expert_count(int(getattr(config, arch.expert_count)))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if arch.expert_size:  # llama.cpp's `llama` takes an expert's size from feed_forward_length (Mixtral's)
            writer.add_expert_feed_forward_length(int(getattr(config, arch.expert_size)))
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(dim * getattr(config, "partial_rotary_factor", 1.0)))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "longrope":
        original = int(getattr(config, "original_max_position_embeddings", None)
                       or rope["original_max_position_embeddings"])
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        # The attention scale of LongRoPE (Phi-3 paper): sqrt(1 + ln(scale) / ln(original context)).
        writer.add_rope_scaling_attn_factors(1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original)))
    if getattr(config, "sliding_window", None) and config.model_type in ("gemma2", "gemma3_text", "phi3"):
        writer.add_sliding_window(int(config.sliding_window))
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))


def extra_tensors(config: Any) -> dict[str, Any]:
    """Tensors llama.cpp needs that the checkpoint does not hold: per-frequency rope divisors (Llama 3.1 rope
    scaling; Phi-3 LongRoPE short and long factors), as float32 numpy arrays under their GGUF names."""
    import numpy as np

    rope = _rope(config)
    if rope["rope_type"] == "longrope":
        return {"rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32)}
    if rope["rope_type"] != "llama3":
        return {}
    dim = head_dim(config)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * float(rope["rope_theta"]) ** (i / dim)
        if wavelength < old_context / high:  # high frequencies: unchanged
            divisors.append(1.0)
        elif wavelength > old_context / low:  # low frequencies: slowed down by the full factor
            divisors.append(factor)
        else:  # in between: transformers blends the two, so the divisor is the blend's inverse
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(divisors, dtype=np.float32)}


def split_experts(name: str, tensor: Any) -> list[tuple[str, Any]]:
    """transformers 5's fused expert weights under the names of the per-projection stacks the `gguf` name map knows:
    `experts.gate_up_proj` [experts, 2 x size, hidden] (gate rows first, as transformers' `chunk(2)` reads them)
    -> `experts.gate_proj.weight` and `experts.up_proj.weight` [experts, size, hidden]; `experts.down_proj`
    [experts, hidden, size] -> `experts.down_proj.weight`. Other weights pass unchanged."""
    if name.endswith(".experts.gate_up_proj") and tensor.ndim == 3:
        gate, up = tensor[:, : tensor.shape[1] // 2], tensor[:, tensor.shape[1] // 2:]
        stem = name.removesuffix("gate_up_proj")
        return [(stem + "gate_proj.weight", gate), (stem + "up_proj.weight", up)]
    if name.endswith(".experts.down_proj") and tensor.ndim == 3:
        return [(name + ".weight", tensor)]
    return [(name, tensor)]


def to_gguf_layout(name: str, tensor: Any, config: Any, arch: Arch) -> Any:
    """A transformers weight (float32 numpy) in the layout llama.cpp expects for its architecture."""
    if arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        rows = tensor.shape[0]
        # Each head's rows are [first halves of all pairs, second halves]; llama.cpp wants pairs side by side.
        return tensor.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
    if arch.norm_plus_one and name.endswith("norm.weight"):
        return tensor + 1.0
    return tensor
