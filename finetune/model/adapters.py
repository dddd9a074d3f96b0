"""The recipe's `lora` section as a peft LoraConfig; attaching, loading and counting adapters."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.model import expert_adapters
from finetune.recipe.schema import LoraConfig


def to_peft(lora: LoraConfig, model=None):
    """`Recipe.lora` -> `peft.LoraConfig`, every field passed by name.

    On a Mixture-of-Experts `model` (a family with fused experts, `finetune.model.families`) the targets are spelled
    out (`moe_targets`): left to itself, peft 0.21 turns `all-linear` into LoRA on every expert and the router.
    """
    import peft

    target_modules, target_parameters = lora.target_modules, None
    if model is not None and family_traits(model).fused_experts:
        target_modules, target_parameters = moe_targets(model, lora)
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        target_parameters=target_parameters,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save or None,
        bias=lora.bias,
        init_lora_weights=lora.init_weights,
        task_type="CAUSAL_LM",
    )


def family_traits(model):
    """The family row of a loaded model (`finetune.model.families`)."""
    from finetune.model.families import traits

    return traits(getattr(getattr(model, "config", None), "model_type", None))


# names of transformers 4's expert and router linear layers: peft 0.21 maps a target module of one of these names onto
# the fused 3D experts of transformers 5 (`target_parameters`), whatever module it really names
_V4_EXPERT_NAMES = {"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def moe_targets(model, lora: LoraConfig) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of a Mixture-of-Experts model under `lora.experts` and `lora.router`.

    Linear layers as the recipe names them (`all-linear` resolved here, as peft would); the experts' fused weights
    and the router's weight as raw parameters when asked. In the families whose targets peft 0.21 rewrites
    (`Traits.peft_moves_mlp_names`), linear layers named like transformers 4's experts (the dense MLP layers of a
    Qwen3-MoE with `mlp_only_layers`) are left out, with a notice: peft would move their adapters onto every expert.
    """
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # listed in finetune/model/private_api.py

    traits = family_traits(model)
    cfg = copy.copy(to_peft(lora))
    names = lora.target_modules
    if isinstance(names, str):
        names = {n.rsplit(".", 1)[-1] for n in _maybe_include_all_linear_layers(cfg, model).target_modules}
    moved = _V4_EXPERT_NAMES if traits.peft_moves_mlp_names else set()
    kept = sorted(n for n in names if n.rsplit(".", 1)[-1] not in moved)
    if len(kept) < len(names):
        left = ", ".join(sorted(set(names) - set(kept)))
        print(f"note: lora.target_modules: {left} get no adapter on this Mixture-of-Experts model (peft would move "
              "them onto every expert); lora.experts decides the experts", flush=True)
    own = expert_adapters.uses_own_adapters(lora, has_nf4_experts(model))  # finetune's, not peft's
    params = list(traits.expert_parameters) if lora.experts == "per_expert" and not own else []
    if lora.router and traits.router_parameter:
        params.append(traits.router_parameter)
    return kept, params


def prepare_base(model, gradient_checkpointing: bool):
    """Make a (4-bit) base ready for adapter training: every weight frozen, in the dtype it was loaded in.

    peft's `prepare_model_for_kbit_training` upcasts the frozen weights that are not quantized (embeddings, LM head,
    norms) to float32: about 2 GB more for an 8B model, a float32 residual stream, and a bf16 copy of the LM head
    made at every micro-step by the bf16 loss. Like trl and Unsloth, they stay in the compute dtype here; what
    checkpointing needs (inputs that require a gradient) is switched on directly.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        if not getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def has_nf4_experts(model) -> bool:
    """Whether `model` holds 4-bit experts (`quantization.experts`)."""
    from finetune.model.moe_experts import NF4Experts

    return any(isinstance(m, NF4Experts) for m in model.modules())


def attach(model, lora: LoraConfig, init_from: str | Path | None = None, adapter_name: str = "default",
           stage: str | None = None, expert_ranks: list[list[int]] | None = None):
    """A fresh adapter from the recipe, or a saved one (trainable) when `init_from` is a folder.

    A saved adapter keeps its own settings: the recipe's `lora` keys that differ from its adapter_config.json are
    ignored, and said once (a warning line, prefixed with the `stage` name when given). finetune's own expert
    adapters (`lora.experts: shared`, `per_expert` on 4-bit experts or ranked by routing: `expert_ranks`, per MoE
    layer one rank per expert) are added beside peft's and travel with it (`carry_expert_adapters`).
    """
    from peft import get_peft_model

    if init_from is None:
        peft_model = get_peft_model(model, to_peft(lora, model), adapter_name=adapter_name)
        traits = family_traits(model)
        if traits.fused_experts and expert_adapters.uses_own_adapters(lora, has_nf4_experts(model)):
            expert_adapters.add(peft_model, traits.expert_parameters, lora.r, lora.alpha,
                                shared=lora.experts == "shared", ranks=expert_ranks, use_rslora=lora.use_rslora,
                                init_b=lora.init_weights is False)
        return carry_expert_adapters(peft_model)
    init_from = Path(init_from)
    if not (init_from / "adapter_config.json").exists():
        raise FinetuneError(f"no adapter at {init_from} (adapter_config.json missing)")
    ignored = ignored_lora_keys(model, lora, init_from)
    if ignored:
        print(f"{f'[{stage}] ' if stage else ''}warning: the stage starts from the adapter in {init_from}, which keeps "
              f"its own settings; these lora keys are ignored: {'; '.join(ignored)}", flush=True)
    return load_trained(model, init_from, adapter_name, trainable=True)


def load_trained(base, folder: str | Path, adapter_name: str = "default", trainable: bool = False):
    """A saved adapter on `base`: peft's, then finetune's own expert adapters when the folder holds them."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name, is_trainable=trainable)
    expert_adapters.load(model, folder, trainable=trainable)
    return carry_expert_adapters(model)


def carry_expert_adapters(peft_model):
    """Make this peft model instance save finetune's expert adapters beside its own (`save_pretrained`: the stage's
    adapter, every checkpoint, the best adapter), load them back (`load_adapter`: `--resume` through the Trainer) and
    switch them off with its own (`disable_adapter`: the base model of forgetting and of export checks). Per
    instance; nothing changes for a model without them."""
    held = expert_adapters.held(peft_model)
    if not held or getattr(peft_model, "_carries_expert_adapters", False):
        return peft_model
    from finetune.model.patches import record

    kind = "one shared by the experts of each layer" if next(iter(held.values())).shared else "one per expert"
    record(peft_model, "experts", f"LoRA on {len(held)} fused expert weights ({kind}) in finetune's experts forward, "
           f"saved as {expert_adapters.EXPERT_FILE} (model/expert_adapters.py)")
    save, load, disable = peft_model.save_pretrained, peft_model.load_adapter, peft_model.disable_adapter

    def save_pretrained(save_directory, *args, **kwargs):
        save(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            expert_adapters.save(peft_model, save_directory)

    def load_adapter(model_id, adapter_name, *args, **kwargs):
        out = load(model_id, adapter_name, *args, **kwargs)
        if adapter_name == "default":
            expert_adapters.load(peft_model, model_id, trainable=bool(kwargs.get("is_trainable", False)))
        return out

    @contextmanager
    def disable_adapter():
        with disable(), expert_adapters.disabled(peft_model):
            yield

    peft_model.save_pretrained, peft_model.load_adapter = save_pretrained, load_adapter
    peft_model.disable_adapter = disable_adapter
    peft_model._carries_expert_adapters = True
    return peft_model


# recipe `lora` key -> its name in peft's LoraConfig / adapter_config.json
_PEFT_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
               "use_rslora": "use_rslora", "use_dora": "use_dora", "modules_to_save": "modules_to_save",
               "bias": "bias", "init_weights": "init_lora_weights"}


def ignored_lora_keys(base, lora: LoraConfig, folder: Path) -> list[str]:
    """`lora.KEY: recipe value -> saved value` for each `lora` key whose value differs from the adapter saved in
    `folder` (`all-linear` is first resolved on `base`, the model before the adapter, as peft resolves it)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # listed in finetune/model/private_api.py

    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    wanted = _maybe_include_all_linear_layers(to_peft(lora, base), base)

    def norm(value: Any, name: str) -> Any:
        if isinstance(value, (list, tuple, set)):
            if name == "target_modules":  # peft resolves `all-linear` to full paths on tied-embedding models and
                value = {v.rsplit(".", 1)[-1] for v in value}  # saves the module names: compare the names
            return sorted(value) or None  # [] and None: nothing
        return value

    out = [f"lora.{key}: {getattr(lora, key)!r} -> {saved.get(name)!r}" for key, name in _PEFT_NAMES.items()
           if norm(getattr(wanted, name), name) != norm(saved.get(name), name)]
    if _raw_names(wanted.target_parameters) != _raw_names(saved.get("target_parameters")):
        out.append(f"lora.experts: {lora.experts!r}, lora.router: {lora.router!r} -> target_parameters "
                   f"{sorted(saved.get('target_parameters') or [])!r}")
    own = family_traits(base).fused_experts and expert_adapters.uses_own_adapters(lora, has_nf4_experts(base))
    layouts = expert_adapters.saved_layouts(folder) or {}
    held = "none" if not layouts else "shared" if next(iter(layouts.values()))["shared"] else "per_expert"
    if (own and held != lora.experts) or (layouts and not own):  # the saved expert adapters are the ones loaded
        out.append(f"lora.experts: {lora.experts!r} -> finetune's expert adapters: {held}")
    return out


def _raw_names(names) -> set[str]:
    """Raw-parameter targets by the part that names them (`mlp.experts.down_proj` and `down_proj` alike)."""
    return {".".join(n.split(".")[-2:]) if n.endswith(".weight") else n.rsplit(".", 1)[-1] for n in names or []}


def adapters_in_float32(model, init_from: str | Path | None = None) -> bool:
    """Every LoRA weight in float32, whatever the training precision; compute follows autocast (bf16 on a GPU).

    trl's trainers cast a 4-bit model's adapter to bfloat16 in their constructor (the QLoRA paper's choice) and keep
    no float32 master copy. A bf16 weight then absorbs only part of each small update (DPO at 5e-6: over 100 steps
    lora_A moved about 15% of what a float32 weight moves), and on a CPU without bf16 units every LoRA matmul runs
    30-100x slower. As peft's default and Unsloth do, the weights stay float32 and autocast runs the matmuls in
    bf16. The cast back cannot undo trl's rounding, so an adapter the stage starts from (`init_from`) is loaded again:
    the stage starts exactly where the previous one ended, and a DPO `sft` reference loaded from that folder equals
    it bit for bit. Call after building the trainer, before `train()` creates the optimizer.

    Returns:
        True when some weight was not float32 (and was cast back).
    """
    cast = False
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != torch.float32 and (param.requires_grad or ".lora_" in name):
            param.data = param.data.float()
            cast = True
    if cast and init_from is not None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(init_from)), adapter_name="default")
    return cast


def trainable_summary(model) -> dict[str, int | float]:
    """Counts of trainable and total parameters (4-bit weights, 4-bit experts included, counted as their logical
    size)."""
    from finetune.model.moe_experts import quantized_expert_numel

    trainable, total = model.get_nb_trainable_parameters()
    total += quantized_expert_numel(model)  # buffers, which peft does not count
    return {"trainable": int(trainable), "total": int(total), "percent": round(100 * trainable / max(total, 1), 4)}


GROUPS = ("attention", "dense MLP", "experts", "router", "other")


def trainable_groups(model) -> dict[str, int]:
    """Trainable parameters by where they sit: attention, dense MLP (a dense model's MLP, a MoE's shared expert),
    experts, router, other (embeddings, LM head, norms); every group listed, zeros included."""
    out = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".mlp.experts." in name:
            group = "experts"
        elif ".mlp.gate." in name:  # the router of the MoE families (Qwen2-MoE's shared_expert_gate: dense MLP)
            group = "router"
        elif "attn" in name or "attention" in name:
            group = "attention"
        elif ".mlp." in name or ".feed_forward." in name:
            group = "dense MLP"
        else:
            group = "other"
        out[group] += param.numel()
    return out


def groups_text(groups: dict[str, int]) -> str:
    """`attention 1,024, dense MLP 0, experts 2,048, router 0` (other only when it holds some)."""
    return ", ".join(f"{k} {v:,}" for k, v in groups.items() if v or k != "other")
