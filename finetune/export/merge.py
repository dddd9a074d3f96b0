"""Merging a LoRA adapter into its base: the trained reference model, the merged float32 weights, the plain folder.

Two merge modes (see `finetune.export.exports`):
- `dequantized`: every weight is taken from the model as training ran it. A 4-bit weight is dequantized by
  bitsandbytes from its packed data and quant state (the very values each training matmul used), the LoRA delta
  B @ A * scale is added in float32, and nothing is requantized.
- `original`: the base is loaded again without quantization, in float32, and peft's `merge_and_unload` merges the
  adapter into it.
Either way each weight is summed in float32 and only then cast to the export dtype, under the key names of a plain
transformers model. finetune's own expert adapters (`lora.experts: shared`, `per_expert` on 4-bit experts) are folded
the same way: s B_e A_e added to every expert e's fused weight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_torch_dtype(recipe: Recipe, dtype: str) -> torch.dtype:
    """The export dtype: as asked, else the recipe's model dtype, else the dtype the base model is stored in."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    from transformers import AutoConfig

    from finetune.model.gguf_base import base_source

    cfg = AutoConfig.from_pretrained(base_source(recipe.model), revision=recipe.model.revision,
                                     trust_remote_code=recipe.model.trust_remote_code)
    stored = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def build_reference(recipe: Recipe, adapter: Path, tokenizer):
    """The trained model as training ran it: the base loaded as the recipe says (4-bit for QLoRA) + the adapter."""
    from finetune.model.adapters import load_trained, prepare_base
    from finetune.model.loading import load_model

    base = load_model(recipe, tokenizer=tokenizer)
    # prepare_base does what training did to the base (frozen, every weight in the dtype it was loaded in).
    base = prepare_base(base, gradient_checkpointing=False)
    return restore_adapter_dtype(load_trained(base, adapter).eval(), adapter)  # with finetune's expert adapters


def restore_adapter_dtype(model, adapter: Path):
    """Put LoRA A/B weights back in the dtype they were saved in, which is the dtype they were trained in.

    Training keeps adapters in float32 (`finetune.model.adapters.adapters_in_float32`), so this does nothing for
    them; adapters of older runs were trained (and saved) in bfloat16, and running those in float32 would not be the
    model that was trained.
    """
    saved = _saved_dtype(Path(adapter) / "adapter_model.safetensors")
    if saved is not None and saved != torch.float32:
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.data = param.data.to(saved)
    return model


def _saved_dtype(path: Path) -> torch.dtype | None:
    """The one floating dtype of the LoRA A/B tensors in an adapter file (None if absent or mixed)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    dtypes = set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." in key or ".lora_B." in key:
                dtypes.add(f.get_slice(key).get_dtype())
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    return names.get(dtypes.pop()) if len(dtypes) == 1 else None


def plain_config(reference):
    """The base config without any trace of quantization (so transformers loads it as a plain model)."""
    config = copy.deepcopy(reference.get_base_model().config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    from finetune.model.moe_experts import plain_experts_implementation

    plain_experts_implementation(config)  # 4-bit experts' forward: the model's own again
    return config


def plain_keys(config, trust_remote_code: bool = False) -> tuple[list[str], dict[str, str]]:
    """State-dict keys of a plain model of `config` (built on the meta device), and its tied keys.

    Returns:
        The keys, each tied weight listed once, and {second name: first name} of the tied ones
        (e.g. {"lm_head.weight": "model.embed_tokens.weight"}).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    first: dict[int, str] = {}
    keys, tied = [], {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:  # a tied weight (lm_head = embed_tokens) is one object under two names
            tied[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
            keys.append(key)
    return keys, tied


def to_conv1d_layout(state: dict[str, torch.Tensor], reference, trust_remote_code: bool = False) -> list[str]:
    """Weights of Conv1D layers (GPT-2 style, stored [in, out]) that the trained model held as Linear ([out, in]),
    transposed back, in place; returns their keys.

    bitsandbytes turns a Conv1D into a Linear4bit holding the weight transposed, so a weight merged from there must
    be transposed again for the plain model's Conv1D slot, whatever its shape (square ones included).
    """
    from transformers import AutoModelForCausalLM

    trained = reference.get_base_model()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_config(reference), trust_remote_code=trust_remote_code)
    done = []
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if type(module).__name__ != "Conv1D" or key not in state:
            continue
        held = trained.get_submodule(name)
        held = held.get_base_layer() if hasattr(held, "get_base_layer") else held
        if type(held).__name__ != "Conv1D":
            state[key] = state[key].T.contiguous()
            done.append(key)
        if tuple(state[key].shape) != tuple(module.weight.shape):
            raise FinetuneError(f"merge: {key} has shape {list(state[key].shape)}, the model expects "
                                f"{list(module.weight.shape)}")
    return done


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """A weight in float32 as the forward pass sees it: 4-bit weights (and 4-bit experts) dequantized by
    bitsandbytes."""
    if type(tensor).__name__ == "NF4Experts":
        return tensor.dequantize().float()
    if type(tensor).__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(tensor.data, tensor.quant_state).float()
    tensor = tensor.detach()
    return tensor.float() if tensor.is_floating_point() else tensor.clone()


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """B @ A * scale in float32 for one adapter of a LoRA linear layer."""
    if layer.use_dora.get(adapter, False):
        raise FinetuneError("DoRA adapters cannot be merged here; export with --format adapter")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if not isinstance(lora_a, torch.nn.Linear) or lora_b.bias is not None:
        raise FinetuneError(
            f"LoRA layer type {type(layer).__name__} is not supported by merged export; export with --format adapter"
        )
    delta = (lora_b.weight.float() @ lora_a.weight.float()) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def _param_wrapper(module, attr: str):
    """The peft `ParamWrapper` that adapts the raw parameter `attr` (the fused experts' `gate_up_proj`, `down_proj`,
    a router's `weight`): peft nests one wrapper per parameter of a module. None when no wrapper adapts it."""
    while type(module).__name__ == "ParamWrapper":
        if module.parameter_name == attr:
            return module
        module = module.base_layer
    return None


def _delta(layer, adapter: str) -> torch.Tensor:
    """The update of one adapter in float32: B @ A * scale for a linear layer; peft's own `get_delta_weight` for a raw
    parameter (per expert for a 3D expert stack, in the layout of the parameter)."""
    if type(layer).__name__ == "ParamWrapper":
        return layer.get_delta_weight(adapter).float()
    return _lora_delta(layer, adapter)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor


def _dequantized_merge(reference, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from finetune.model import expert_adapters

    model = reference.get_base_model()
    own = {key: lora for key, lora in expert_adapters.held(reference).items() if lora.enabled}
    state = {}
    for key in keys:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, ModulesToSaveWrapper):  # trained in full: the adapter's own copy is the weight
            module = module.modules_to_save[module.active_adapters[0]]
        if isinstance(module, LoraLayer):
            tensor = _full_precision(getattr(module.get_base_layer(), attr))
            if type(module).__name__ == "ParamWrapper":  # LoRA on raw parameters (MoE experts, routers)
                layer = _param_wrapper(module, attr)
            else:
                layer = module if attr == "weight" else None
            if layer is not None:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + _delta(layer, adapter).to(tensor.device)
        else:
            tensor = _full_precision(getattr(module, attr))
            if key in own:  # finetune's expert adapters: s B_e A_e into every expert e (model/expert_adapters.py)
                tensor = tensor + own[key].delta().to(tensor.device)
        state[key] = _cast(tensor, dtype).cpu()  # summed in float32, cast per tensor: peak memory ~ the export
    return state


def _original_merge(recipe: Recipe, adapter: Path, tokenizer, keys: list[str], dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    # peft merges in the weights' dtype, so the base is loaded in float32 (memory: 4 bytes per parameter).
    from peft import PeftModel

    from finetune.model.loading import load_model

    full = recipe.model_copy(deep=True)
    full.quantization.mode = "none"
    full.quantization.experts = False
    full.model.dtype = "float32"
    base = load_model(full, tokenizer=tokenizer)
    from finetune.model import expert_adapters

    model = PeftModel.from_pretrained(base, str(adapter))
    own = expert_adapters.load(model, adapter) and expert_adapters.held(model)  # finetune's expert adapters
    state = model.merge_and_unload().state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise FinetuneError(f"merge: the merged model lacks {missing[:3]}; this model type is not supported")
    for key, lora in (own or {}).items():  # s B_e A_e into every expert e of the original weights
        state[key] = state[key].detach().float() + lora.delta()
    return {k: _cast(state[k].detach(), dtype).cpu() for k in keys}


def merged_state_dict(recipe: Recipe, adapter: Path, reference, tokenizer, mode: str,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights of base + adapter under plain transformers key names, merged in float32 as `mode` says, then cast.

    A tied weight appears once, unless training untied it (e.g. lm_head in lora.modules_to_save while the base ties
    it to the input embeddings): then both names are kept and `save_plain_model` unties them in the config.
    """
    keys, tied = plain_keys(plain_config(reference), recipe.model.trust_remote_code)
    if mode == "dequantized":
        state = _dequantized_merge(reference, keys + list(tied), dtype)
        to_conv1d_layout(state, reference, recipe.model.trust_remote_code)
    else:  # peft merged into the plain model's own layers: every weight already has their layout
        state = _original_merge(recipe, adapter, tokenizer, keys + list(tied), dtype)
    for second, first in tied.items():
        if torch.equal(state[second], state[first]):
            del state[second]
    return state


def save_plain_model(state: dict[str, torch.Tensor], reference, folder: Path, dtype: torch.dtype, tokenizer,
                     max_shard_size: str = "5GB") -> None:
    """Safetensors shards (cast to `dtype`), config.json without quantization, generation_config.json.

    The generation config stops on the tokenizer's eos as well (a chat template may end turns with its own token)
    and pads with its pad token.
    """
    from huggingface_hub import save_torch_state_dict

    from finetune.data.templates import stop_ids

    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: _cast(v, dtype) for k, v in state.items()}
    save_torch_state_dict(cast, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config = plain_config(reference)
    config.dtype = dtype
    if any(second in state for second in plain_keys(config)[1]):
        config.tie_word_embeddings = False  # the trained output layer differs from the input embeddings
    config.save_pretrained(str(folder))
    generation = copy.deepcopy(reference.get_base_model().generation_config)
    if generation is not None:
        eos = generation.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        eos += [i for i in stop_ids(tokenizer) if i not in eos]  # the end-of-turn token too, where it is not eos
        generation.eos_token_id = eos[0] if len(eos) == 1 else eos
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(str(folder))
