"""The LM head only where a label is: the default fast path of the SFT loss and of trl's DPO log-probs.

With a 32k+ vocabulary the LM head is a large share of a small or mid-size model's compute, and with the loss on
assistant turns only, most positions (the prompts) carry no label. trl's SFTTrainer scores every position through its
own chunked head (it keeps only the labelled ones on Triton devices) and also computes the entropy and top-1 of
every position for its logs: on a CPU that is the largest single cost of a step, and the biggest memory peak
(tiles of 4096 tokens x the vocabulary, in float32).

Here the backbone runs as usual, the hidden states of the positions whose next token is labelled are gathered, and
the chunked cross-entropy of `finetune.kernels.cross_entropy` (logits exist one chunk of tokens at a time; with the
frozen head of LoRA the gradient for the hidden states is formed in that same pass) gives the summed negative
log-likelihood, divided like trl's loss (by the labelled tokens of the whole accumulated batch when the trainer
passes `num_items_in_batch`). The loss is the same number trl computes; only the wasted work is gone. Logged
metrics: loss (and the token count for tokens/s), not trl's entropy / mean token accuracy, which are what need the
full-vocabulary pass on every position.

The loss is computed inside the model's forward (a per-instance patch, like trl's own `fused_lm_head`) so that DDP
and accelerate's autocast wrappers see an ordinary forward call, and FSDP2 / ZeRO-3 shards of the head's weight are
gathered there first (`gathered_head`, as trl's head does).

DPO (`install_compact_fused_head`): trl's DPOTrainer needs per-token log-probs and its own metrics from its fused
head, so there the patch keeps trl's kernel and outputs and only gathers the labelled (completion) positions first.
trl 1.16 has no padding-free DPO (its flag is switched off); with `padding_free=True` the patch also runs the
right-padded chosen/rejected batch as one padding-free row (samples back to back, positions restarting, sample
boundaries for per-sample attention) and maps the hidden states back to the batch's positions: no compute and no
attention mask on padding, same log-probs.

Over 300 lines: both heads, their trainer and the rules they share (which models qualify, chunk sizes, gathering
the head) stay in one module, so that a change to one rule is seen by both heads.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from finetune.model.attention import PACKED as PACKED_ATTENTION

FLAG = "label_positions_loss"
# Logit transforms the plain `hidden @ W.T` of the chunked loss would silently skip: such models keep trl's path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_CHUNK_LOGITS = 2**24  # logits elements per chunk off CUDA (64 MB in float32): big matmuls, bounded memory
_CUDA_CHUNK_LOGITS = 2**26  # on a GPU at most this many (about 512 MB of chunk buffers at 8 bytes per element) ...
_CUDA_FREE_SHARE = 16  # ... and at most 1/16 of the free memory
ROW_TILE = 128  # chunks hold a multiple of this many rows: whole tensor-core tiles (130 rows would waste a tile)
CHUNK_BYTES_PER_LOGIT = 8  # one chunk at a time: bf16 logits, their float32 copy and bf16 softmax (GPU, bf16)


def unsupported_reason(model: Any) -> str | None:
    """Why the label-positions loss cannot run on this (peft-wrapped) causal LM, or None when it can."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.requires_grad:
        return "the LM head is missing, adapted or trained"
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear"
    return config_unsupported_reason(lm.config)


def logit_transform(config: Any) -> str | None:
    """The transform a model's config applies to `hidden @ head` (soft-capping, a scale), or None when none."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return f"the model transforms its logits ({name}={value})"
    return None


def config_unsupported_reason(config: Any) -> str | None:
    """What in a model's config rules the label-positions loss out (see `unsupported_reason`), or None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if transform := logit_transform(config):
        return transform
    if getattr(cfg, "output_router_logits", False) or getattr(cfg, "num_experts_per_tok", None):
        return "mixture-of-experts models add a router loss"
    if config is not cfg:
        return "multimodal models keep trl's loss"
    return None


def chunk_rows(vocab: int, device: torch.device | str = "cpu") -> int:
    """Labelled tokens per chunk of the label-positions loss: a multiple of :data:`ROW_TILE`, at least one tile.

    The chunk's logits are `rows x vocab`: up to 2**24 elements off CUDA; on CUDA up to 2**26 elements and at most
    1/16 of the free memory at :data:`CHUNK_BYTES_PER_LOGIT` bytes each (Llama 3's 128k vocabulary: 512 rows).
    """
    budget = _CHUNK_LOGITS
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(_CUDA_CHUNK_LOGITS, free // (_CUDA_FREE_SHARE * CHUNK_BYTES_PER_LOGIT))
    return _rows(budget, vocab)


def max_chunk_rows(vocab: int) -> int:
    """The most rows `chunk_rows` gives on any device (a GPU with plenty of free memory): for memory estimates."""
    return _rows(max(_CHUNK_LOGITS, _CUDA_CHUNK_LOGITS), vocab)


def _rows(budget: int, vocab: int) -> int:
    return max(ROW_TILE, budget // max(vocab, 1) // ROW_TILE * ROW_TILE)


def install(model: Any) -> None:
    """Patch the causal LM instance inside `model`: `forward(..., label_positions_loss=True)` returns the loss only."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm, "_ft_label_loss", False):
        return
    original = lm.forward

    def forward(self, *args, label_positions_loss: bool = False, **kwargs):
        if not label_positions_loss:
            return original(*args, **kwargs)
        return _label_loss(self, **kwargs)

    forward._finetune_head = FLAG
    lm.forward = types.MethodType(forward, lm)
    lm._ft_label_loss = True


def head_of(model: Any) -> str | None:
    """Which of our loss heads is the outermost forward of the causal LM in `model` (`label_positions_loss` or
    `compact_fused_head`), or None when neither is (not installed, or something wrapped it since)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(lm.forward, "__func__", None), "_finetune_head", None)


@contextmanager
def gathered_head(lm: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The LM head's weight and bias, whole, for a loss that reads them directly instead of calling the head.

    Under FSDP2 they are DTensor shards: gathered with `full_tensor()` (a differentiable all-gather). Under DeepSpeed
    ZeRO-3 a parameter is empty outside its module's forward: trl's `maybe_gather_lm_head_ctx` gathers it for the
    block (a null context otherwise). Both as trl's own fused head does; the frozen head's gradient for the hidden
    states is formed in the forward (`finetune.kernels.cross_entropy`), so the backward needs no second gather.
    Call it inside the model's forward (the loss heads do), where ZeRO-3's hooks expect the access.
    """
    from torch.distributed.tensor import DTensor
    from trl.trainer import utils as trl_utils

    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    with trl_utils.maybe_gather_lm_head_ctx(weight, bias):
        yield weight, bias


def _label_loss(lm: Any, labels: torch.Tensor, num_items_in_batch: Any = None, **kwargs: Any):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from finetune.kernels.cross_entropy import token_nll

    kwargs["use_cache"] = False
    hidden = lm.base_model(**kwargs).last_hidden_state  # the decoder (LlamaModel, ...), not the peft wrapper
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != -100
    picked = hidden[:, :-1][mask]  # [labelled tokens, H]: the only rows the loss needs
    with gathered_head(lm) as (weight, bias):
        chunk = chunk_rows(weight.shape[0], picked.device)
        nll = token_nll(picked, weight, shifted[mask], bias, chunk_size=chunk)
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = nll.sum() / torch.as_tensor(denom, device=nll.device).clamp(min=1)
    return CausalLMOutputWithPast(loss=loss)


# The per-token fields trl's DPOTrainer (1.16) reads from its fused LM head: log-probs for the loss, the others for
# its logged metrics (entropy, logits/chosen|rejected, mean token accuracy).
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
VOCAB_CHUNK = 8192  # vocabulary columns per tile of trl's kernel (its own default is 32768: 4x the tile memory)


def install_compact_fused_head(model: Any, outputs: tuple[str, ...] = DPO_OUTPUTS, padding_free: bool = False,
                               chunked_ce: bool = False) -> None:
    """Answer trl's `fused_lm_head=True` forwards from the labelled positions only, with trl's own kernel.

    trl's fused head gathers the labelled positions before its chunked kernel on Triton devices only; elsewhere (CPU)
    it scores every position, prompts and padding included, in tiles of 4096 tokens x 32768 vocabulary entries. This
    per-instance patch (outermost, install it after the trainer is built) runs the backbone, gathers the positions
    whose next token is labelled, and calls the same `trl.kernels.ChunkedLogProbFunction` on them, so the outputs
    (zero at ignored positions, like trl's) and the gradients are the ones trl computes.

    `padding_free`: run right-padded batches as one padding-free row (see the module docstring); it needs an attention
    that reads sample boundaries (`finetune.model.attention.use_per_sample_attention`), else it is ignored.
    `chunked_ce` (the recipe's `kernels.fused_ce`): the labelled positions go through our chunked cross-entropy
    (`finetune.kernels.cross_entropy.token_nll_and_stats`, Triton row kernels on CUDA, the frozen head's gradient
    formed in the forward) instead of trl's kernel; same log-probs and logged metrics.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm, "_ft_compact_head", False):
        return
    if chunked_ce and "log_sum_sq_probs" in outputs:
        raise ValueError("the chunked cross-entropy does not compute log_sum_sq_probs; use trl's kernel")
    original = lm.forward

    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if fused_lm_head and not args and kwargs.get("shift_labels") is None and "labels" in kwargs:
            pack = padding_free and getattr(self.config, "_attn_implementation", None) in PACKED_ATTENTION
            return _compact_fused(self, outputs, pack=pack, chunked_ce=chunked_ce, **kwargs)
        if fused_lm_head:  # pre-shifted labels (context parallelism) and positional calls: trl's own path
            kwargs["fused_lm_head"] = True
        return original(*args, **kwargs)

    forward._finetune_head = "compact_fused_head"
    lm.forward = types.MethodType(forward, lm)
    lm._ft_compact_head = True


def _padding_free_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor] | None:
    """A right-padded batch as one padding-free row: model kwargs, and each sample's offset in the row. None when the
    batch is not plain right-padded token ids (left padding, embeddings, explicit positions, an empty sample)."""
    ids, am = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if (ids is None or am is None or am.dim() != 2 or kwargs.get("inputs_embeds") is not None
            or kwargs.get("position_ids") is not None):
        return None
    keep = am.bool()
    lengths = keep.sum(1)
    positions = torch.arange(am.shape[1], device=am.device).expand_as(keep)
    if not torch.equal(keep, positions < lengths[:, None]) or bool((lengths == 0).any()):
        return None
    bounds = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    packed = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    packed.update(input_ids=ids[keep][None], position_ids=positions[keep][None], cu_seq_lens_q=bounds,
                  cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return packed, bounds[:-1].long()


def _compact_fused(lm: Any, outputs: tuple[str, ...], labels: torch.Tensor, num_items_in_batch: Any = None,
                   shift_labels: None = None, pack: bool = False, chunked_ce: bool = False, **kwargs: Any):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    shifted = labels[:, 1:]
    mask = shifted != -100
    packed = _padding_free_kwargs(kwargs) if pack else None
    lm._ft_ran_padding_free = packed is not None  # read by the benchmark probe (scripts/bench_probe.py): slots computed
    if packed is None:
        hidden = lm.base_model(**kwargs).last_hidden_state[:, :-1]
        mask = mask.to(hidden.device)
        picked_hidden = hidden[mask]
    else:  # position t of sample b sits at offset[b] + t of the row; a labelled next token lies in the same sample
        row_kwargs, offsets = packed
        row = lm.base_model(**row_kwargs).last_hidden_state[0]
        mask = mask.to(row.device)
        at = offsets.to(row.device)[:, None] + torch.arange(mask.shape[1], device=row.device)
        picked_hidden = row[at[mask]]
    shifted = shifted.to(mask.device)
    with gathered_head(lm) as (weight, bias):
        if chunked_ce:
            from finetune.kernels.cross_entropy import token_nll_and_stats

            chunk = chunk_rows(weight.shape[0], picked_hidden.device)
            nll, entropy, mean_logits, top1 = token_nll_and_stats(picked_hidden, weight, shifted[mask], bias,
                                                                  chunk_size=chunk)
            got = {"log_probs": -nll, "entropy": entropy, "mean_logits": mean_logits, "is_top1": top1.bool()}
            picked = [got.get(name) if name in outputs or name == "log_probs" else None
                      for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")]
        else:  # trl's backward gathers a ZeRO-3 head again itself
            picked = ChunkedLogProbFunction.apply(picked_hidden, weight, bias, shifted[mask], 1.0, VOCAB_CHUNK,
                                                  None, 1.0, outputs)
    # back to [batch, seq - 1], zero where no label; masked_scatter keeps an all-masked batch differentiable
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in picked)
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / torch.as_tensor(denom, device=log_probs.device).clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


def trainer_class():
    """trl's SFTTrainer with the label-positions loss when the model has that head (`install`), else trl's own.

    The part after the loss (DDP scaling, the `num_tokens` count) mirrors trl's `SFTTrainer.compute_loss`;
    `tests/unit/test_fast_paths.py` compares both on the same batches, so a trl upgrade that changes it fails there.
    """
    from trl import SFTTrainer

    class LabelLossSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss comes from the model's label-positions forward (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if head_of(self.model) != FLAG:  # no label-positions head on this model (finetune.model.patches)
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch, **{FLAG: True})
            loss = outputs.loss
            # As trl: with num_items_in_batch counted over every process, DDP's gradient averaging needs this.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if self.model.training:  # the token count trl logs as num_tokens (our tokens/s)
                if "attention_mask" in inputs:
                    n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                else:
                    n = self.accelerator.gather_for_metrics(
                        torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)).sum().item()
                self._total_train_tokens += n // self.get_tp_size()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return LabelLossSFTTrainer
