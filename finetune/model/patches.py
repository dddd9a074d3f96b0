"""The one place that changes a loaded model: `apply_patches`, in a stated order, recorded on the model instance.

Every change finetune makes to a transformers/peft object is per instance (no class is touched, other models in the
process stay as they are) and is listed in the model's record (`applied`), which the stage banner prints and the
stage summary keeps. The order, bottom of the `*ForCausalLM.forward` stack first:

0. `bitsandbytes`: the AVX-512 CPU fix (`finetune.model.bnb_cpu`), applied where it must be, while loading
   (`finetune.model.loading.load_model`), and recorded here. Nothing on CUDA or other CPUs.
   (trl's trainer constructor then adds its own fused LM head, `trl.trainer.utils.add_fused_lm_head`, on the forward.)
1. `kernel`: the fused kernels the recipe switches on (`kernels:`), on module instances below the causal LM
   (`finetune.model.kernels`: norms, attention, MLP, LoRA linears); none of them wraps `*ForCausalLM.forward`.
2. `lean saves`: `training.lean_saves`, RMSNorm outputs and gated-MLP activations recreated in backward instead of
   kept (`finetune.model.lean_saves`): norm forward hooks, the gated MLPs' forward (where it is their class's own),
   saved-tensor hooks around the causal LM's training forwards.
3. `tiled mlp`: `training.tiled_mlp`, each decoder layer's MLP run over sequence tiles in training
   (`finetune.model.tiled_mlp`), wrapping whatever forward the MLP has (a fused kernel's included).
4. `attention`: the padding-free rows' attention, chosen for the device (`finetune.model.attention`: flash-attention 2
   or torch's varlen kernel on CUDA in fp16/bf16, per-sample sdpa elsewhere), printed with the stage banner.
5. `loss head`: the SFT label-positions loss or the DPO compact fused head (`finetune.model.loss_heads`), the
   outermost forward and the only finetune wrapper of `*ForCausalLM.forward`: it answers the trainer's calls before
   trl's fused head does. It owns `kernels.fused_ce` too: SFT's head always computes its loss with the chunked
   cross-entropy (`finetune.kernels.cross_entropy`); DPO's head does with `fused_ce` on, else with trl's kernel.
   Stages without our head (trl's own loss) record that `fused_ce` is not used there.
6. `offload`: `training.offload_activations`, saved-tensor hooks around the causal LM's training forwards
   (`finetune.model.offload`): forward hooks, no forward replaced.

`apply_patches` runs once per model, after the trainer is built (so that the loss head sits above trl's head) and
before anything is measured or trained; a second call refuses, and every patch only wraps what was there before it.
"""

from __future__ import annotations

from typing import Any, Literal

from finetune.errors import FinetuneError
from finetune.model import lean_saves, loss_heads, tiled_mlp
from finetune.model.attention import use_padding_free_attention
from finetune.recipe.schema import Recipe

RECORD = "_finetune_patches"  # attribute of the *ForCausalLM instance holding the record
# "base": where the weights came from
ORDER = ("base", "bitsandbytes", "experts", "kernel", "lean saves", "tiled mlp", "attention", "loss head", "offload")


def causal_lm(model: Any) -> Any:
    """The `*ForCausalLM` inside a peft model (or the model itself): the instance every patch and the record live on."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def applied(model: Any) -> list[str]:
    """What has been applied to this model, in order: `"<patch>: <what it changed>"` lines (empty when nothing)."""
    return list(getattr(causal_lm(model), RECORD, ()))


def record(model: Any, patch: str, what: str) -> None:
    """Add one line to the model's record. `patch` is one of :data:`ORDER`; a patch earlier in the order than one
    already applied is refused (it would end up under it)."""
    if patch not in ORDER:
        raise ValueError(f"unknown patch {patch!r} (known: {', '.join(ORDER)})")
    lm = causal_lm(model)
    lines = getattr(lm, RECORD, [])
    later = [line for line in lines if ORDER.index(line.split(":", 1)[0]) > ORDER.index(patch)]
    if later:
        raise FinetuneError(f"model patch '{patch}' must come before '{later[0]}', which is already applied")
    setattr(lm, RECORD, [*lines, f"{patch}: {what}"])


def apply_patches(model: Any, recipe: Recipe, stage: str, kind: Literal["sft", "dpo", "trl"], padding_free: bool,
                  ) -> list[str]:
    """Apply every change this stage makes to its (peft-wrapped) model, in the order of the module docstring.

    Call it once, on `trainer.model` right after the trainer is built.

    Args:
        model: The peft-wrapped causal LM the trainer holds.
        recipe: The typed recipe (`kernels:` switches, `lora` for the kernel checks).
        stage: The stage's name, for error messages.
        kind: `sft` (label-positions loss), `dpo` (compact fused head under trl's DPO loss) or `trl` (the other
            alignment stages: trl's own loss, kernels only).
        padding_free: Whether the stage's batches are, or may be made, padding-free rows.

    Returns:
        The model's whole record (:func:`applied`), including what loading applied.

    Raises:
        FinetuneError: When this model was already patched, or the recipe's kernels do not fit it.
    """
    done = [line for line in applied(model) if not line.startswith(("base:", "bitsandbytes:", "experts:"))]  # loading
    if done:
        raise FinetuneError(f"stage '{stage}': the model is already patched ({done[0]}, ...); patches are applied "
                            "once per loaded model")
    for line in apply_recipe_kernels(model, recipe):
        record(model, "kernel", line)
    ours = [s for s in recipe.effective_stages() if s.name == stage]
    training = recipe.stage_training(ours[0]) if ours else recipe.training
    if training.lean_saves and not training.offload_activations:
        lean = lean_saves.install(causal_lm(model))
        if lean:
            record(model, "lean saves", lean)
    tiled = tiled_mlp.install(causal_lm(model), training.tiled_mlp)
    if tiled:
        record(model, "tiled mlp", tiled)
    no_head = "this stage's trl loss" if kind == "trl" else loss_heads.unsupported_reason(model)
    # SFT's collator makes the padding-free rows itself; in DPO the compact head makes them, so only with that head.
    rows = padding_free and (kind == "sft" or no_head is None)
    attention = use_padding_free_attention(model) if rows else None
    if attention:
        record(model, "attention", f"{attention} within padding-free rows (finetune.model.attention)")
    fused_ce = recipe.kernels.fused_ce
    if no_head is not None:  # nothing patched: recorded so that the banner and the summary say which loss ran
        record(model, "loss head", f"none, trl's own loss and fused LM head ({no_head})" +
               ("; kernels.fused_ce is not used by it" if fused_ce else ""))
    elif kind == "sft":
        loss_heads.install(model)
        record(model, "loss head", "chunked cross-entropy (fused_ce) on labelled positions only "
               "(finetune.model.loss_heads)")
    else:
        pack = any(line.startswith("attention:") for line in applied(model))
        loss_heads.install_compact_fused_head(model, padding_free=pack, chunked_ce=fused_ce)
        kernel = "our chunked cross-entropy (kernels.fused_ce)" if fused_ce else "trl's fused LM head kernel"
        record(model, "loss head", f"{kernel} on labelled positions only" +
               (", padded batches run as padding-free rows" if pack else "") + " (finetune.model.loss_heads)")
    if training.offload_activations:
        import torch

        from finetune.model import offload

        record(model, "offload", offload.install(causal_lm(model)) if torch.cuda.is_available() else
               "not applied: no CUDA device (training.offload_activations moves GPU memory to the host)")
    problems = undone(model)
    if problems:
        raise FinetuneError(f"stage '{stage}': a model patch was undone while patching: " + "; ".join(problems))
    return applied(model)


def undone(model: Any) -> list[str]:
    """The recorded patches that are no longer in place on this model (empty when all are): a kernel forward replaced,
    the attention switched back, or another forward wrapped above the loss head."""
    from finetune.kernels import hf_forwards as hf
    from finetune.model.attention import PACKED

    lm = causal_lm(model)
    lines = applied(model)
    problems = []
    kernel_forwards = {hf.rmsnorm_forward, hf.attention_forward, hf.mlp_forward, hf.lora_linear_forward}
    replaced = [name for name, m in lm.named_modules()
                if hasattr(m, hf.ORIG) and not tiled_mlp.is_tiled(m)
                and getattr(m.forward, "__func__", None) not in kernel_forwards]
    if any(line.startswith("tiled mlp:") and "not applied" not in line for line in lines):
        lost = [name for name, m in tiled_mlp.decoder_mlps(lm)
                if hasattr(m, tiled_mlp.ORIG) and not tiled_mlp.is_tiled(m)]
        if lost:
            problems.append(f"tiled MLP forwards replaced on {', '.join(lost[:3])}")
    if replaced:
        problems.append(f"kernel forwards replaced on {', '.join(n or type(lm).__name__ for n in replaced[:3])}")
    if any(line.startswith("attention:") for line in lines) and lm.config._attn_implementation not in PACKED:
        problems.append(f"attention is {lm.config._attn_implementation!r}, not one of {', '.join(PACKED)}")
    head = [line for line in lines if line.startswith("loss head:") and not line.startswith("loss head: none")]
    if head and loss_heads.head_of(lm) is None:
        problems.append(f"{type(lm).__name__}.forward is no longer the loss head (something wrapped it)")
    return problems


def apply_recipe_kernels(model: Any, recipe: Recipe) -> list[str]:
    """Patch this model instance with the fused kernels the recipe switches on (`kernels:`); nothing when all off.

    Unsupported architectures or adapter options fail with the reasons before any training step.

    Returns:
        One line per patched kernel saying what was patched.
    """
    if not recipe.kernels.enabled():
        return []
    from finetune.model.kernels import apply_kernels, check_kernel_support

    model_type = getattr(causal_lm(model).config, "model_type", "")
    problems = check_kernel_support(model_type, recipe.lora, recipe.kernels)
    if problems:
        raise FinetuneError("kernels: " + "; ".join(problems))
    return apply_kernels(model, recipe.kernels)
