"""Export a trained stage of a run: the adapter alone, or a merged plain transformers model that checks itself.

Merged export of a QLoRA run merges, by default, into the base weights exactly as the adapter saw them in training:
each 4-bit weight is dequantized with bitsandbytes, the LoRA delta is added in float32, and only then is the sum cast
to the export dtype. Merging into the original full-precision weights instead (`merge_into="original"`) gives a model
the adapter was never trained against; verification reports how far it lands from the trained model.

Every merged export is loaded back from disk with plain transformers and compared with the trained model on held-out
conversations (`finetune.export.verify`); it is refused when the mean KL per token exceeds `max_kl`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from finetune.errors import FinetuneError
from finetune.export.destination import check_out, staged_out
from finetune.export.modelcard import export_metadata, public_base, public_manifest, render_card
from finetune.export.runstage import ExportResult, RunStage
from finetune.export.verify import DEFAULT_MAX_KL, Figures
from finetune.run.files import read_json, write_json_atomic, write_text_atomic

MergeInto = Literal["dequantized", "original"]
EXPERT_FILE = "expert_adapter.safetensors"  # finetune.model.expert_adapters.EXPERT_FILE (torch-free import here)
ExportDType = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _copy_tokenizer(run: RunStage, dest: Path) -> None:
    """The stage's tokenizer files (with its chat template and pad token) into an export."""
    adapter_files = {"adapter_config.json", "adapter_model.safetensors", "README.md", EXPERT_FILE}
    for f in run.tokenizer_dir.iterdir():
        if f.is_file() and f.name not in adapter_files:
            shutil.copy2(f, dest / f.name)


def default_out(run: RunStage, fmt: str) -> Path:
    """`<run>/export/<stage>-<format>`."""
    return run.run_dir / "export" / f"{run.stage.name}-{fmt}"


def export_adapter(run: RunStage, out: Path | None = None, overwrite: bool = False,
                   repo_id: str | None = None) -> ExportResult:
    """A standard PEFT folder: the trained adapter (byte for byte), the tokenizer and chat template, a model card."""
    out = check_out(out or default_out(run, "adapter"), overwrite, run.run_dir)
    with staged_out(out, overwrite, run.run_dir) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (run.adapter / name).exists():
                raise FinetuneError(f"{run.adapter}/{name} is missing; rerun stage '{run.stage.name}'")
            shutil.copy2(run.adapter / name, tmp / name)
        _copy_tokenizer(run, tmp)
        result = ExportResult(out=out, format="adapter", stage=run.stage.name)
        if (run.adapter / EXPERT_FILE).exists():  # finetune's own expert adapters: ours to load, not peft's
            shutil.copy2(run.adapter / EXPERT_FILE, tmp / EXPERT_FILE)
            result.notes.append(
                f"{EXPERT_FILE} holds finetune's own expert adapters (lora.experts: shared, or per_expert on 4-bit "
                "experts), which finetune loads (ft generate, ft eval, ft export on this folder's run) and peft does "
                "not: peft.PeftModel.from_pretrained loads adapter_model.safetensors alone, the model without its "
                "expert updates. For a model that runs without finetune, export with --format merged")
        _name_public_base(run, tmp / "adapter_config.json", result)
        write_card(run, result, tmp, repo_id)
    return result


def _name_public_base(run: RunStage, config_path: Path, result: ExportResult) -> None:
    """adapter_config.json names the base by its Hub id when one is known (peft wrote the folder training loaded)."""
    config = read_json(config_path, {})
    hub = public_base(run)
    if hub is not None:
        if config.get("base_model_name_or_path") != hub:
            config["base_model_name_or_path"] = hub
            write_json_atomic(config_path, config)
    else:
        result.notes.append(
            f"adapter_config.json names the base '{config.get('base_model_name_or_path')}', a local folder: the "
            "adapter finds it from here only. Before uploading, set model.hub_id (the Hub id that folder is a copy "
            "of) and export again, or users of the upload must pass the base model themselves")


def check_mergeable(adapter_dir: Path, merge_into: str = "dequantized") -> None:
    """Refuse adapters a merged export cannot reproduce exactly, saying why and what to do instead.

    LoRA on raw parameters (peft's `target_parameters`: the fused 3D experts and the routers of MoE families) is
    merged either way: peft's own delta per expert (`finetune.export.merge`).
    """
    cfg = read_json(adapter_dir / "adapter_config.json", {})
    hint = "Export it with --format adapter instead (load it on the base with peft)."
    if cfg.get("peft_type") != "LORA":
        raise FinetuneError(f"{adapter_dir}: a {cfg.get('peft_type')} adapter cannot be merged here; {hint}")
    if cfg.get("use_dora"):
        raise FinetuneError(
            f"{adapter_dir}: merged export of DoRA adapters is refused. DoRA rescales each weight column by a norm "
            "computed from the base weight, so a merge into NF4-dequantized weights would not reproduce training "
            f"faithfully and we do not ship a merge we cannot verify. {hint}"
        )
    for key, what in (("lora_bias", "LoRA biases"), ("trainable_token_indices", "trainable token rows")):
        if cfg.get(key):
            raise FinetuneError(
                f"{adapter_dir}: adapters with {what} ({key}) are not supported by merged export; {hint}"
            )


def export_merged(
    run: RunStage,
    out: Path | None = None,
    dtype: ExportDType = "auto",
    merge_into: MergeInto = "dequantized",
    verify: bool = True,
    max_kl: float = DEFAULT_MAX_KL,
    compare: bool = False,
    verify_samples: int = 16,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> ExportResult:
    """Merge the stage's adapter into the base and write a plain transformers model folder that verifies itself.

    Args:
        run: the finished stage to export (`open_run`).
        out: destination folder (default `<run>/export/<stage>-merged`).
        dtype: weight dtype of the export; `auto` keeps the base model's stored dtype.
        merge_into: `dequantized` (QLoRA: the NF4 weights as training saw them) or `original` (the full-precision
            base weights). A run without quantization always merges into the original weights.
        verify: compare the export with the trained model on held-out conversations and refuse it above `max_kl`.
        max_kl: ceiling on the mean KL(trained || export) per token, in nats.
        compare: also measure the other merge mode (reported, never written).
        verify_samples: how many held-out conversations to compare on.
        overwrite: replace an existing `out`.
        repo_id: Hub repo the card should name in its usage snippet.
    """
    import torch

    quantized = run.recipe.quantization.mode != "none"
    if not quantized and merge_into == "dequantized":
        merge_into = "original"  # nothing was quantized: the weights training saw are the original ones
    check_mergeable(run.adapter, merge_into)
    out = check_out(out or default_out(run, "merged"), overwrite, run.run_dir)
    try:
        with staged_out(out, overwrite, run.run_dir) as tmp:
            result = _merge_into(run, tmp, out, dtype, merge_into, verify, max_kl, compare, verify_samples, repo_id)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _merge_into(run: RunStage, tmp: Path, out: Path, dtype: ExportDType, merge_into: MergeInto, verify: bool,
                max_kl: float, compare: bool, verify_samples: int, repo_id: str | None) -> ExportResult:
    """The merged export written into `tmp` (moved to `out` by the caller)."""
    from finetune.export.merge import build_reference, export_torch_dtype, merged_state_dict, save_plain_model
    from finetune.model.loading import load_tokenizer

    quantized = run.recipe.quantization.mode != "none"
    tokenizer = load_tokenizer(run.recipe.model, str(run.tokenizer_dir))
    torch_dtype = export_torch_dtype(run.recipe, dtype)
    reference = build_reference(run.recipe, run.adapter, tokenizer)
    modes: list[str] = [merge_into]
    if compare and quantized:
        modes.append("original" if merge_into == "dequantized" else "dequantized")
    result = ExportResult(out=out, format="merged", stage=run.stage.name, merge_into=merge_into,
                          dtype=str(torch_dtype).removeprefix("torch."))
    if not quantized:
        result.notes.append("the base was not quantized, so the weights training saw are the original ones"
                            + ("; --compare has no second merge mode to measure" if compare else ""))
    inputs = None
    if verify or compare:
        from finetune.export.verify import adapter_effect, verification_inputs

        inputs, result.verification_source = verification_inputs(run.recipe, run.stage, tokenizer,
                                                                 count=verify_samples)
        result.adapter_effect = adapter_effect(reference, inputs).as_dict()
    for mode in modes:
        folder = tmp if mode == merge_into else tmp.with_name(f".{out.name}.compare")
        state = merged_state_dict(run.recipe, run.adapter, reference, tokenizer, mode, torch_dtype)
        save_plain_model(state, reference, folder, torch_dtype, tokenizer)
        del state
        if inputs is not None:
            result.figures[mode] = _measure(reference, folder, inputs, torch_dtype).as_dict()
        if folder != tmp:
            shutil.rmtree(folder, ignore_errors=True)
    del reference
    if verify:
        _check_threshold(result, max_kl)
    _copy_tokenizer(run, tmp)
    write_card(run, result, tmp, repo_id, max_kl=max_kl if verify else None)
    return result


def _measure(reference, folder: Path, inputs: list[list[int]], torch_dtype) -> Figures:
    """Load the written folder back with plain transformers (no peft, no bitsandbytes) and compare it."""
    from transformers import AutoModelForCausalLM

    from finetune.export.verify import compare_logits

    device = next(reference.parameters()).device
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(device).eval()
    try:
        return compare_logits(reference, exported, inputs)
    finally:
        del exported


def _check_threshold(result: ExportResult, max_kl: float) -> None:
    figures = Figures(**result.figures[result.merge_into])
    if figures.mean_kl <= max_kl:
        return
    why = (
        "The original-weights merge gives a model the adapter was never trained against (training saw the 4-bit "
        "weights), so some difference is expected: accept it with a higher --max-kl, or export with "
        "--merge-into dequantized."
        if result.merge_into == "original"
        else "The merged weights do not reproduce the trained model"
        + (f" (if rounding to {result.dtype} is the cause, --dtype fp32 shows it and a higher --max-kl accepts it)"
           if result.dtype != "float32" else "; please report this with the run's recipe")
        + "."
    )
    raise FinetuneError(
        f"export refused: the merged model differs from the trained model above the threshold "
        f"(mean KL {figures.mean_kl:.3g} > --max-kl {max_kl:g}); {figures.line()}. {why} Nothing was written."
    )


def write_card(run: RunStage, result: ExportResult, folder: Path, repo_id: str | None,
               max_kl: float | None = None) -> None:
    """The model card (README.md), export.json and the run's public manifest.json into an export folder."""
    write_text_atomic(folder / "README.md", render_card(run, result, repo_id=repo_id, max_kl=max_kl))
    write_json_atomic(folder / "export.json", export_metadata(run, result))
    manifest = public_manifest(run.run_dir)
    if manifest is not None:
        write_json_atomic(folder / "manifest.json", manifest)
