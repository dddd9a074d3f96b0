"""Tokenizer and base model from the recipe: dtype, BitsAndBytesConfig for QLoRA, offline-aware Hub loading."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from finetune.distributed.process import quantized_device_map
from finetune.errors import FinetuneError
from finetune.model import bnb_cpu
from finetune.model.gguf_base import base_source, describe_base
from finetune.recipe.checks import hub_cached, hub_offline_reason, looks_like_hub_id
from finetune.recipe.gguf_source import gguf_path
from finetune.recipe.schema import ModelConfig, QuantizationConfig, Recipe, TrainingConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, float32 otherwise."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def resolve_precision(training: TrainingConfig) -> str:
    """Autocast precision actually used: `auto` is bf16 or fp16 on a GPU, fp32 on CPU."""
    if training.precision != "auto":
        return training.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _source_kwargs(cfg: ModelConfig) -> dict:
    """revision / local_files_only / trust_remote_code for any from_pretrained call on the base model."""
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if gguf_path(cfg) is not None:
        return kwargs  # loaded from its dequantized folder (model/gguf_base.py)
    if looks_like_hub_id(cfg.name_or_path):
        kwargs["revision"] = cfg.revision
        reason = hub_offline_reason()
        if reason is not None:
            if not hub_cached(cfg.name_or_path, cfg.revision):
                raise FinetuneError(
                    f"model.name_or_path '{cfg.name_or_path}': the Hub cannot be reached ({reason}) and no copy is in "
                    "the local cache; point model.name_or_path at a local folder"
                )
            kwargs["local_files_only"] = True
    elif not Path(cfg.name_or_path).exists():
        raise FinetuneError(f"model.name_or_path '{cfg.name_or_path}' does not exist")
    return kwargs


def bnb_config(quant: QuantizationConfig, model_dtype: torch.dtype):
    """The BitsAndBytesConfig of the recipe, or None without quantization."""
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    # bitsandbytes' AVX-512 CPU dequantization is wrong for some shapes (model/bnb_cpu.py); a 4-bit model goes to the
    # GPU wherever there is one (load_model), and then nothing is registered
    bnb_cpu.apply("cuda" if torch.cuda.is_available() else "cpu")
    compute = model_dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype)
    storage = torch.uint8 if quant.quant_storage == "auto" else resolve_dtype(quant.quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_tokenizer(cfg: ModelConfig | None, source: str | None = None):
    """The base model's tokenizer (or the one at `source`), with a pad token that is never the eos token.

    Every tokenizer is loaded here: training, evaluation (`--against` included), generation and exports.
    """
    from transformers import AutoTokenizer

    cfg = cfg or ModelConfig(name_or_path=str(source))
    tok = AutoTokenizer.from_pretrained(source or base_source(cfg), **_source_kwargs(cfg))
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok) -> None:
    """Give the tokenizer a pad token distinct from eos.

    Padding with eos is a classic silent bug: the collator masks pad positions, so the model never learns to stop.
    Prefer a token the tokenizer already has (its own padding token, such as NeoX's `<|padding|>`, or an unused
    reserved one, such as Llama 3's), then unk; only then add `<|pad|>` (the embedding is resized by the caller, and
    peft then saves the whole embedding and output layer with every adapter).
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    was = "none" if tok.pad_token is None else f"{tok.pad_token}, the same as eos"
    own = own_pad_token(tok)
    if own is not None:
        tok.pad_token = own
    elif tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token
    else:
        tok.add_special_tokens({"pad_token": "<|pad|>"})  # a new token: the model's embeddings grow by one
    print(f"[tokenizer] note: the pad token was {was}; padding with {tok.pad_token} (id {tok.pad_token_id}) instead, "
          "so that the model still learns to stop (pad positions carry no label)", flush=True)


_PAD_NAMES = ("<|finetune_right_pad_id|>", "<|padding|>", "<|pad|>", "<pad>", "[PAD]")


def own_pad_token(tok) -> str | None:
    """A token of the tokenizer's own vocabulary made for padding, else an unused reserved special token, else None.

    Never eos, bos or unk, and never a token the chat template writes.
    """
    taken = {tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    for name in _PAD_NAMES:
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid not in taken and name not in template:
            return name
    added = sorted((i, str(t)) for i, t in tok.added_tokens_decoder.items())
    for pattern in (r"pad", r"reserved"):  # e.g. <|reserved_special_token_0|> (Llama 3)
        for tid, name in added:
            if re.search(pattern, name, re.IGNORECASE) and tid not in taken and name not in template:
                return name
    return None


def _fix_bitsandbytes(model) -> None:
    """bitsandbytes' AVX-512 CPU fixes (model/bnb_cpu.py; nothing elsewhere), recorded with the model's patches."""
    from finetune.model.patches import record

    device = next(model.parameters()).device.type
    changed = bnb_cpu.fix_model(model)
    if bnb_cpu.apply(device):  # registered by bnb_config() already, before the weights were quantized: only said here
        record(model, "bitsandbytes", "CPU dequantize_4bit kernel that reads AVX-512 blocks right (model/bnb_cpu.py)")
    if changed:
        record(model, "bitsandbytes", f"AVX-512 bf16 repacking off on {changed} Linear4bit layers (model/bnb_cpu.py)")


def _quantize_experts(model, recipe: Recipe) -> None:
    """`quantization.experts`: the fused experts of a MoE model to NF4 (model/moe_experts.py), recorded."""
    from finetune.model.families import traits
    from finetune.model.moe_experts import quantize_experts
    from finetune.model.patches import record

    names = traits(getattr(model.config, "model_type", None)).expert_parameters
    quant = recipe.quantization
    compute = resolve_dtype(recipe.model.dtype if quant.compute_dtype == "auto" else quant.compute_dtype)
    done = quantize_experts(model, names, compute, quant.double_quant)
    if done:
        record(model, "experts", f"{done} fused expert weights in NF4, routed experts dequantized in the matmul "
               "(model/moe_experts.py)")


def own_memory(model) -> int:
    """Give every plain floating-point weight on the CPU memory of its own; returns how many were copied.

    transformers memory-maps safetensors files and leaves a weight that needs no conversion as a view of that map.
    Once the rest is quantized, those few views (embeddings, norms, routers, the LM head) keep every page of the file
    that loading read resident for the whole run: 0.6 GB of a 0.65 GB Qwen3-MoE-like checkpoint with its experts in
    NF4 (`scripts/bench_train.py --preset moe`). The copies are as large as those weights; each Parameter stays the
    same object, so tied weights stay tied.
    """
    seen: set[int] = set()
    for param in model.parameters():  # a tied weight is listed once
        if type(param) is not torch.nn.Parameter or not param.is_floating_point() or param.device.type != "cpu":
            continue  # bitsandbytes' Params4bit and the NF4 experts' buffers are quantized copies already
        if id(param) not in seen:
            seen.add(id(param))
            param.data = param.data.clone()
    return len(seen)


def load_model(recipe: Recipe, training: TrainingConfig | None = None, tokenizer=None):
    """Load the base model as the recipe says (4-bit NF4 for QLoRA), ready for adapters."""
    from transformers import AutoModelForCausalLM

    cfg = recipe.model
    dtype = resolve_dtype(cfg.dtype)
    quant = bnb_config(recipe.quantization, dtype)
    kwargs = _source_kwargs(cfg)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None and not torch.cuda.is_available():
        kwargs["device_map"] = {"": "cpu"}
    elif quant is not None and (device_map := quantized_device_map(recipe)) is not None:
        kwargs["device_map"] = device_map  # DDP: each process loads its own 4-bit copy onto its own GPU
    model = AutoModelForCausalLM.from_pretrained(
        base_source(cfg), dtype=dtype, quantization_config=quant, use_safetensors=True, **kwargs
    )
    if (origin := describe_base(cfg)) is not None:
        from finetune.model.patches import record

        record(model, "base", origin)  # printed with the stage banner: the weights are a dequantized GGUF
    if quant is not None:
        _fix_bitsandbytes(model)
    if recipe.quantization.experts:
        _quantize_experts(model, recipe)
    if quant is not None or recipe.quantization.experts:  # the checkpoint's full weights are not needed any more
        own_memory(model)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            # Stop generation where the chat template ends a turn (a registry template may change eos).
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    if training is not None and training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def free_stage_memory() -> None:
    """Free what a finished stage held: its model, trainer and optimizer state.

    They are unreachable once the stage returns, but not freed: the trainer, its accelerator and callbacks, and the
    per-instance forward patches (a bound method stored on the module it is bound to) form reference cycles, which
    only the cycle collector frees, at a time of its choosing. Collected here, and the CUDA allocator's cache handed
    back, so that the next stage's model does not sit on the GPU beside the last one.
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
