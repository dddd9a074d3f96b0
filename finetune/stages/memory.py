"""Peak memory of one training step, from its parts: what `ft train --dry-run` prints and what recipes are sized by.

The parts, in bytes, at the longest micro-batch (`tokens` = sequences x their length; DPO: chosen and rejected):

- `quantized_weights`: 4-bit NF4 linear weights, half a byte each, plus their block scales (blocks of 64: a float32
  scale each, or with double quantization an 8-bit one and a float32 per 256 blocks);
- `frozen_weights`: frozen floating weights in the dtype they were loaded in: embeddings, LM head (unless tied),
  norms, MoE routers, and every linear weight of a base that is not quantized;
- `expert_weights` (MoE models): the experts' fused weights (experts x 3 x hidden x expert size per MoE layer, from
  the config), in their loaded dtype (bitsandbytes quantizes `nn.Linear` only), or NF4 (`quantization.experts`);
- `adapter`: trainable weights (float32), their gradients (float32) and the optimizer state;
- `kept_activations`: what the forward keeps for backward. With gradient checkpointing each layer's input; without
  it every layer's activations (`layer_activation_bytes`: norm inputs in float32, q/k/v/attention output, the MLP's
  gate, up, activation and product, LoRA dropout outputs and masks, eager attention's score matrices; a MoE layer
  its router logits, per routed expert and token the expert's input, gate/up output and product, and peft's expert
  stacks with `lora.experts: per_expert`); none with `training.offload_activations` (they wait in host memory: a
  GPU's estimate);
- `recomputed_layer`: with checkpointing, the one layer recomputed in backward, and the gradients flowing through it;
  with a tiled MLP (`training.tiled_mlp`, `finetune.model.tiled_mlp`) no layer keeps its MLP's intermediates (gate,
  activation, up, the down projection's input, the LoRA outputs and dropout masks): one tile's are alive at a time,
  counted here;
- `loss`: the loss head. The label-positions loss (`finetune.model.loss_heads`) keeps the final norm's output, the
  labelled positions' hidden states and their float32 gradient, and one chunk of logits at a time (rows from
  `loss_heads.chunk_rows`); trl's loss (models whose logits are transformed) keeps the full logits, their float32
  copy and log-softmax. DPO's compact head keeps the labelled positions and one tile of trl's kernel.
- `generation_cache` (GRPO only): the key/value cache of sampling. trl generates a whole generation batch (micro
  batch x gradient accumulation completions, `grpo.num_generations` per prompt) in one `generate` call:
  completions x (prompt + completion tokens) x layers x 2 (keys, values) x key/value heads x head size x bytes, plus
  the float32 next-token logits of the batch. Sampling runs without gradients between optimizer steps, when the
  training step's activations are freed, so the peak is the larger of the two phases, not their sum.

CUDA context and allocator fragmentation come on top (typically 0.5-1.5 GB): recipes keep 15% of the GPU for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.model import tiled_mlp
from finetune.stages.model_shape import ModelShape

NF4_BLOCK = 64
RECIPE_MARGIN = 0.85  # a recipe's estimate stays under this share of its stated GPU (see the module docstring)


@dataclass
class Memory:
    """Estimated peak memory of one training step, in bytes, by part (see the module docstring)."""

    quantized_weights: int
    frozen_weights: int
    adapter: int
    kept_activations: int
    recomputed_layer: int
    loss: int
    generation_cache: int = 0
    expert_weights: int = 0

    @property
    def total(self) -> int:
        """The weights and optimizer state, plus the larger of the training step's buffers and sampling's cache."""
        static = self.quantized_weights + self.frozen_weights + self.expert_weights + self.adapter
        return static + max(self.kept_activations + self.recomputed_layer + self.loss, self.generation_cache)

    def line(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in asdict(self).items()
                          if v and k != "generation_cache")
        if self.generation_cache:
            parts += f"; while sampling (instead of those) generation KV cache {gb(self.generation_cache)}"
        return f"{parts}: about {gb(self.total)} in all"


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**28 else f"{n / 2**20:.1f} MB"


def nf4_bytes(params: int, double_quant: bool) -> int:
    """4-bit weights with their block scales."""
    blocks = -(-params // NF4_BLOCK)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return params // 2 + scales


def optimizer_bytes_per_param(optimizer: str) -> int:
    """Optimizer state per trainable weight: Adam keeps two float32 moments, the 8-bit variants one byte each."""
    return 0 if optimizer == "sgd" else 2 if "8bit" in optimizer else 8


def layer_activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, dropout: bool = False,
                           lora_r: int = 0, eager: tuple[int, int] | None = None, moe: bool = False,
                           expert_copy_bytes: int = 0, expert_inputs: int = 1, expert_lora_r: int = 0) -> int:
    """What one decoder layer with LoRA on every projection keeps for backward over `tokens` tokens.

    Per token (measured with saved-tensor hooks on the tiny model, `tests/integration/test_dry_run.py`): each RMSNorm
    keeps its input in float32 (8 x hidden bytes for two) and its reciprocal norm; attention keeps q, k, v and its
    output, and its log-sum-exp per head; the MLP keeps gate, activation and up (3 x intermediate). Frozen base
    projections keep nothing, but each LoRA branch keeps its input: under autocast (float32 adapters, bf16 compute)
    a bf16 copy per adapter (5 x hidden + q + intermediate), in float32 one per distinct input (2 x hidden + q +
    intermediate); with LoRA dropout each adapter also keeps its float32 mask. Each branch keeps its rank-r output.
    `eager` (sequences, length): eager attention's score and probability matrices.

    `moe`: a MoE layer (linear adapters on attention only): the router's float32 logits and probabilities and, for
    each of the token's `top_k` experts, `expert_inputs` copies of its input (2 when bitsandbytes' 4-bit matmul or
    peft's parametrized weight keeps one more), its gate/up output and product. `expert_copy_bytes`: what peft builds
    per layer for `lora.experts: per_expert` and the backward keeps (measured: two expert stacks). `expert_lora_r`:
    finetune's own expert adapters (`shared`, `per_expert` on 4-bit experts), which keep, per routed token, the inputs
    of their A matmuls (the expert's input unless the 4-bit matmul keeps it already, and the down projection's input)
    and their two rank-r outputs.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    if moe:  # adapters on q, k, v (input: hidden) and o (input: q); the MLP's experts, see the docstring
        hidden_inputs, mlp_input, distinct_hidden, adapters = 3, 0, 1, 4
        lora = 0
        if expert_lora_r:  # the A matmuls keep their inputs (the 4-bit matmul keeps the expert's input already)
            lora = (h if expert_inputs == 1 else 0) + shape.expert_intermediate + 2 * expert_lora_r
        mlp = (act_bytes * shape.top_k * (expert_inputs * h + 3 * shape.expert_intermediate + lora)
               + 8 * shape.experts)
    else:
        hidden_inputs, mlp_input, distinct_hidden, adapters = 5, i, 2, 7
        mlp = act_bytes * 3 * i
    per_adapter = hidden_inputs * h + q + mlp_input
    lora_inputs = per_adapter if act_bytes < 4 or dropout else distinct_hidden * h + q + mlp_input
    per_token = (8 * h + 8 + 4 * shape.heads + act_bytes * (2 * q + 2 * kv + lora_inputs + adapters * lora_r) + mlp
                 + (4 * per_adapter if dropout else 0))
    total = tokens * per_token + expert_copy_bytes
    if eager is not None:
        sequences, length = eager
        total += 2 * sequences * shape.heads * length * length * act_bytes
    return total


def mlp_activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, dropout: bool = False,
                         lora_r: int = 0) -> int:
    """The MLP's share of `layer_activation_bytes`: gate, activation and up (3 x intermediate), the down
    projection's LoRA input (intermediate), the three LoRA branches' rank-r outputs, and with dropout their masks."""
    h, i = shape.hidden, shape.intermediate
    return tokens * (act_bytes * (4 * i + 3 * lora_r) + (4 * (2 * h + i) if dropout else 0))


def lean_dropped_bytes(shape: ModelShape, tokens: int, act_bytes: int, dropout: bool, tiled: bool) -> int:
    """What `training.lean_saves` keeps out of one dense layer's `layer_activation_bytes`: in float32 without LoRA
    dropout the two norm outputs (the LoRA branches' inputs) and the MLP's activation and product (its down
    projection's LoRA input); with dropout or under autocast the branches keep their own copies, so only the
    activation. A tiled MLP keeps none of its intermediates anyway."""
    plain = act_bytes == 4 and not dropout
    return tokens * act_bytes * ((2 * shape.hidden if plain else 0)
                                 + (0 if tiled else (2 if plain else 1) * shape.intermediate))


def loss_bytes(shape: ModelShape, tokens: int, labelled: int, act_bytes: int, label_loss: bool, kind: str) -> int:
    """The loss head's buffers (see the module docstring); `label_loss`: the label-positions path runs."""
    from finetune.model import loss_heads

    final_norm = tokens * shape.hidden * (4 + act_bytes)  # its float32 input, the last hidden state
    # trl's loss over every position (also kto, orpo, simpo, grpo): logits, their float32 copy, log-softmax
    if not label_loss or kind not in ("sft", "dpo"):
        return final_norm + tokens * shape.vocab * (act_bytes + 8)
    picked = labelled * shape.hidden * (act_bytes + 4)  # the labelled positions' hidden states, their float32 grad
    per_logit = 4 if act_bytes == 4 else loss_heads.CHUNK_BYTES_PER_LOGIT
    if kind == "dpo":  # trl's kernel: tiles of up to 4096 tokens x its vocabulary chunk, and their float32 gradient
        return final_norm + picked + min(labelled, 4096) * min(shape.vocab, loss_heads.VOCAB_CHUNK) * (act_bytes + 4)
    rows = min(labelled, loss_heads.max_chunk_rows(shape.vocab)) if labelled else 0
    return final_norm + picked + rows * shape.vocab * per_logit


def generation_cache_bytes(shape: ModelShape, completions: int, tokens: int, act_bytes: int) -> int:
    """Sampling's key/value cache for `completions` sequences of up to `tokens` (prompt + completion) tokens, with
    the float32 next-token logits of the batch (see the module docstring)."""
    return completions * tokens * shape.layers * 2 * shape.kv_dim * act_bytes + completions * shape.vocab * 4


def estimate(shape: ModelShape, *, recipe: Any, training: Any, kind: str, sequences: int, seq_len: int,
             labelled: int | None = None, act_bytes: int = 2, label_loss: bool = True, eager: bool = False,
             trainable: int | None = None, generation: tuple[int, int] | None = None) -> Memory:
    """Peak memory of a training step over `sequences` x `seq_len` tokens (`labelled` of them carry a label).

    Args:
        shape: The model's sizes.
        recipe: The recipe (quantization, model dtype, LoRA).
        training: The stage's training section (checkpointing, optimizer).
        kind: `sft` or `dpo`.
        sequences: Sequences per micro-batch (DPO: twice the pairs).
        seq_len: The longest sequence length.
        labelled: Tokens carrying a label (default: all of them, the worst case).
        act_bytes: Bytes per activation (2 under bf16/fp16 autocast, 4 in fp32).
        label_loss: Whether the label-positions loss head runs (else trl's full logits).
        eager: Whether attention is eager (keeps the score matrices).
        trainable: Trainable weights when known (the loaded model's count); else from the LoRA settings.
        generation: GRPO's sampling: (completions generated together, prompt + completion tokens of each).

    Returns:
        The parts.
    """
    tokens = sequences * seq_len
    labelled = tokens if labelled is None else labelled
    dtype_bytes = 4 if recipe.model.dtype == "float32" else 2
    quantized = recipe.quantization.mode != "none"
    frozen = shape.floating_params * dtype_bytes + (0 if quantized else shape.linear_params * dtype_bytes)
    q_bytes = nf4_bytes(shape.linear_params, recipe.quantization.double_quant) if quantized else 0
    lora = recipe.lora
    if trainable is None:
        trainable = shape.lora_params(lora.r, lora.target_modules, lora.experts, lora.router)
    adapter = trainable * (8 + optimizer_bytes_per_param(training.optimizer))
    kwargs = {"dropout": lora.dropout > 0, "lora_r": lora.r, "eager": (sequences, seq_len) if eager else None}
    dense_layer = layer_activation_bytes(shape, tokens, act_bytes, **kwargs) if shape.dense_layers else 0
    tile = 0  # a tiled MLP (dense layers): no layer keeps its MLP intermediates, one tile's are alive in backward
    tiles = tiled_mlp.tile_count(getattr(training, "tiled_mlp", "off"), seq_len)
    if tiles > 1 and shape.dense_layers:
        dense_layer -= mlp_activation_bytes(shape, tokens, act_bytes, lora.dropout > 0, lora.r)
        tile = mlp_activation_bytes(shape, sequences * -(-seq_len // tiles), act_bytes, lora.dropout > 0, lora.r)
    lean = (getattr(training, "lean_saves", False) and not training.gradient_checkpointing
            and not getattr(training, "offload_activations", False))
    if lean and shape.dense_layers:
        dense_layer -= lean_dropped_bytes(shape, tokens, act_bytes, lora.dropout > 0, tiles > 1)
    nf4_experts = quantized and recipe.quantization.experts
    own = recipe.own_expert_adapters()  # finetune's expert adapters (model/expert_adapters.py)
    per_expert = lora.experts == "per_expert" and not own  # peft's: it materializes each layer's adapted stack
    copy = 2 * shape.expert_params // max(shape.moe_layers, 1) * dtype_bytes if per_expert else 0
    moe_layer = shape.moe_layers and layer_activation_bytes(
        shape, tokens, act_bytes, moe=True, expert_copy_bytes=copy, expert_inputs=1 + (per_expert or nf4_experts),
        expert_lora_r=lora.r if own else 0, **kwargs)
    if training.gradient_checkpointing:
        kept = shape.layers * tokens * shape.hidden * act_bytes
        recomputed = max(dense_layer + tile, moe_layer) + 2 * tokens * shape.hidden * act_bytes  # and grads in/out
    else:
        kept = shape.dense_layers * dense_layer + shape.moe_layers * moe_layer
        recomputed = tile
    if getattr(training, "offload_activations", False):
        kept = 0  # in host memory (a GPU's estimate; on the CPU nothing is moved)
    return Memory(quantized_weights=q_bytes, frozen_weights=frozen, adapter=adapter, kept_activations=kept,
                  recomputed_layer=recomputed, loss=loss_bytes(shape, tokens, labelled, act_bytes, label_loss, kind),
                  generation_cache=generation_cache_bytes(shape, *generation, act_bytes) if generation else 0,
                  expert_weights=nf4_bytes(shape.expert_params, recipe.quantization.double_quant)
                  if quantized and recipe.quantization.experts else shape.expert_params * dtype_bytes)


def sequences_per_micro_batch(kind: str, micro_batch_size: int) -> int:
    """Sequences one micro batch runs through the model: preference pairs run chosen and rejected together; KTO runs
    each answer and a mismatched one (its KL estimate); GRPO's micro batch counts completions."""
    return micro_batch_size * (1 if kind in ("sft", "grpo") else 2)


def recipe_estimate(config: Any, recipe: Any, stage: Any, seq_len: int | None = None,
                    labelled: int | None = None, trainable: int | None = None) -> Memory:
    """A stage's estimate for a model config: the path that runs for it, at the longest micro-batch by default."""
    from finetune.model import loss_heads
    from finetune.model.loading import resolve_precision

    training, data = recipe.stage_training(stage), recipe.stage_data(stage)
    sequences = sequences_per_micro_batch(stage.kind, training.micro_batch_size)
    attn = recipe.model.attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    seq_len = seq_len or data.max_length
    generation = None
    if stage.kind == "grpo":  # one generate call per generation batch (trl: steps_per_generation = accumulation)
        generation = (training.micro_batch_size * training.gradient_accumulation_steps, seq_len)
    return estimate(ModelShape.of(config), recipe=recipe, training=training, kind=stage.kind, sequences=sequences,
                    seq_len=seq_len, labelled=labelled,
                    act_bytes=4 if resolve_precision(training) == "fp32" else 2,
                    label_loss=loss_heads.config_unsupported_reason(config) is None, eager=attn == "eager",
                    trainable=trainable, generation=generation)
