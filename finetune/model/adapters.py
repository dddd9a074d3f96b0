"""The recipe's `lora` section as a peft LoraConfig; attaching, loading and counting adapters."""

from __future__ import annotations

from pathlib import Path

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


def prepare_base(model, quantized: bool, gradient_checkpointing: bool):
    """Make a (4-bit) base ready for adapter training: frozen weights, input grads for checkpointing."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def attach(model, lora: LoraConfig, init_from: str | Path | None = None, adapter_name: str = "default"):
    """A fresh adapter from the recipe, or a saved one (trainable) when `init_from` is a folder."""
    from peft import PeftModel, get_peft_model

    if init_from is None:
        return get_peft_model(model, to_peft(lora), adapter_name=adapter_name)
    init_from = Path(init_from)
    if not (init_from / "adapter_config.json").exists():
        raise FinetuneError(f"no adapter at {init_from} (adapter_config.json missing)")
    return PeftModel.from_pretrained(model, str(init_from), adapter_name=adapter_name, is_trainable=True)


def trainable_summary(model) -> dict[str, int | float]:
    """Counts of trainable and total parameters (4-bit weights counted as their logical size)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "percent": round(100 * trainable / max(total, 1), 4)}


def apply_recipe_kernels(model, recipe, stage: str) -> list[str]:
    """Patch this model instance with the fused kernels the recipe switches on (`kernels:`); nothing when all off.

    Unsupported architectures or adapter options fail with the reasons before any training step.
    """
    if not recipe.kernels.enabled():
        return []
    from finetune.model.kernels import apply_kernels, check_kernel_support

    base_config = getattr(model.get_base_model(), "config", None) if hasattr(model, "get_base_model") else None
    model_type = getattr(base_config or model.config, "model_type", "")
    problems = check_kernel_support(model_type, recipe.lora, recipe.kernels)
    if problems:
        raise FinetuneError("kernels: " + "; ".join(problems))
    patched = apply_kernels(model, recipe.kernels)
    for line in patched:
        print(f"[{stage}] kernel: {line}", flush=True)
    return patched
