"""The sizes of a decoder-only transformer that training memory depends on (`finetune.stages.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention: [:4]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    q_dim: int  # attention heads x head size
    kv_dim: int  # key/value heads x head size
    heads: int
    vocab: int
    tied: bool  # LM head shares the embedding matrix
    # Mixture-of-Experts (0 for dense models): experts per MoE layer, each expert's intermediate size, experts per
    # token, layers whose MLP is the experts (the others are dense), the shared expert's intermediate size (Qwen2-MoE)
    experts: int = 0
    expert_intermediate: int = 0
    top_k: int = 0
    moe_layers: int = 0
    shared_intermediate: int = 0

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """From a transformers config (the text config of a multimodal one)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        intermediate = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
        moe: dict[str, int] = {}
        if experts:  # Qwen-MoE's rule for which layers are sparse (Mixtral and OLMoE: all of them)
            dense = set(getattr(cfg, "mlp_only_layers", None) or [])
            step = getattr(cfg, "decoder_sparse_step", None) or 1
            moe = {"experts": experts, "top_k": getattr(cfg, "num_experts_per_tok", None) or 1,
                   "expert_intermediate": getattr(cfg, "moe_intermediate_size", None) or intermediate,
                   "moe_layers": sum(1 for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0),
                   "shared_intermediate": getattr(cfg, "shared_expert_intermediate_size", None) or 0}
        return cls(hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, intermediate=intermediate,
                   q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, heads=heads, vocab=cfg.vocab_size,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)), **moe)

    def linear_dims(self, intermediate: int | None = None) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one dense layer (of an MLP of `intermediate`, by default the config's)."""
        h, i = self.hidden, self.intermediate if intermediate is None else intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    dense_layers = property(lambda self: self.layers - self.moe_layers)

    @property
    def linear_params(self) -> int:
        """Weights of the `nn.Linear` layers (what bitsandbytes quantizes): attention, dense MLPs, shared experts."""
        dense = sum(a * b for a, b in self.linear_dims().values())
        moe = sum(a * b for a, b in self.linear_dims(self.shared_intermediate).values())
        return self.dense_layers * dense + self.moe_layers * (moe + (self.hidden if self.shared_intermediate else 0))

    @property
    def expert_params(self) -> int:
        """The experts' fused gate/up [E, 2I, H] and down [E, H, I] weights of every MoE layer."""
        return self.moe_layers * self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def floating_params(self) -> int:
        """Embeddings, LM head (when not tied), norms (two per layer and the final one) and MoE routers."""
        return (self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden
                + self.moe_layers * self.experts * self.hidden)

    def lora_params(self, r: int, targets: str | list[str], experts: str = "none", router: bool = False) -> int:
        """Trainable LoRA weights for rank `r` on `targets` (`all-linear` or projection names), and on a MoE model's
        experts and router as `lora.experts` and `lora.router` ask (a shared expert as a dense MLP with its gate;
        dense MLP layers of a MoE model get none: `finetune.model.adapters.moe_targets`)."""
        names = _LORA_TARGETS if targets == "all-linear" else [t for t in targets if t in _LORA_TARGETS]
        dims = self.linear_dims()
        if not self.experts:
            return self.layers * sum(r * (dims[n][0] + dims[n][1]) for n in names)
        shared = self.linear_dims(self.shared_intermediate)
        attention = sum(r * (dims[n][0] + dims[n][1]) for n in names if n in _LORA_TARGETS[:4])
        shared_mlp = sum(r * (shared[n][0] + shared[n][1]) for n in names if n not in _LORA_TARGETS[:4])
        shared_mlp += r * (self.hidden + 1) if targets == "all-linear" else 0  # and the shared expert's gate
        h, ei = self.hidden, self.expert_intermediate  # gate/up: h -> 2 ei, down: ei -> h
        per_expert = r * (2 * h + 3 * ei) if experts == "per_expert" else 0
        shared_experts = r * (2 * h + 3 * ei) if experts == "shared" else 0  # one update for all of a layer's experts
        moe = (self.experts * per_expert + shared_experts + shared_mlp * bool(self.shared_intermediate)
               + r * (h + self.experts) * router)
        return self.layers * attention + self.moe_layers * moe
