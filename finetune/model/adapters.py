"""The recipe's `lora` section as a peft LoraConfig; attaching, loading and counting adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.recipe.schema import LoraConfig


def to_peft(lora: LoraConfig):
    """`Recipe.lora` -> `peft.LoraConfig`, every field passed by name."""
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save or None,
        bias=lora.bias,
        init_lora_weights=lora.init_weights,
        task_type="CAUSAL_LM",
    )


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


def attach(model, lora: LoraConfig, init_from: str | Path | None = None, adapter_name: str = "default",
           stage: str | None = None):
    """A fresh adapter from the recipe, or a saved one (trainable) when `init_from` is a folder.

    A saved adapter keeps its own settings: the recipe's `lora` keys that differ from its adapter_config.json are
    ignored, and said once (a warning line, prefixed with the `stage` name when given).
    """
    from peft import PeftModel, get_peft_model

    if init_from is None:
        return get_peft_model(model, to_peft(lora), adapter_name=adapter_name)
    init_from = Path(init_from)
    if not (init_from / "adapter_config.json").exists():
        raise FinetuneError(f"no adapter at {init_from} (adapter_config.json missing)")
    ignored = ignored_lora_keys(model, lora, init_from)
    if ignored:
        print(f"{f'[{stage}] ' if stage else ''}warning: the stage starts from the adapter in {init_from}, which keeps "
              f"its own settings; these lora keys are ignored: {'; '.join(ignored)}", flush=True)
    return PeftModel.from_pretrained(model, str(init_from), adapter_name=adapter_name, is_trainable=True)


# recipe `lora` key -> its name in peft's LoraConfig / adapter_config.json
_PEFT_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
               "use_rslora": "use_rslora", "use_dora": "use_dora", "modules_to_save": "modules_to_save",
               "bias": "bias", "init_weights": "init_lora_weights"}


def ignored_lora_keys(base, lora: LoraConfig, folder: Path) -> list[str]:
    """`lora.KEY: recipe value -> saved value` for each `lora` key whose value differs from the adapter saved in
    `folder` (`all-linear` is first resolved on `base`, the model before the adapter, as peft resolves it)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # listed in finetune/model/private_api.py

    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    wanted = _maybe_include_all_linear_layers(to_peft(lora), base)

    def norm(value: Any, name: str) -> Any:
        if isinstance(value, (list, tuple, set)):
            if name == "target_modules":  # peft resolves `all-linear` to full paths on tied-embedding models and
                value = {v.rsplit(".", 1)[-1] for v in value}  # saves the module names: compare the names
            return sorted(value) or None  # [] and None: nothing
        return value

    return [f"lora.{key}: {getattr(lora, key)!r} -> {saved.get(name)!r}" for key, name in _PEFT_NAMES.items()
            if norm(getattr(wanted, name), name) != norm(saved.get(name), name)]


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
    """Counts of trainable and total parameters (4-bit weights counted as their logical size)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "percent": round(100 * trainable / max(total, 1), 4)}
