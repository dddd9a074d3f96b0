"""GGUF export for llama.cpp, Ollama and LM Studio: merge as the merged export does, write one GGUF file, check it
with llama.cpp itself, and write an Ollama Modelfile, the model card and export.json beside it.

Every check that needs no model (the quantisation name, a finished run, an architecture and rope type we map, a
tokenizer llama.cpp reads the same way (byte-level BPE, or SentencePiece style with a space prefix llama.cpp reproduces)
with a chat template, llama-cpp-python when it is needed) runs before the base model loads.
The file is compared with the merged float32 transformers model on held-out conversations (`finetune.export.
llamacpp`) and refused, with nothing written, above the thresholds of its quantisation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.export.destination import check_out, staged_out
from finetune.export.exports import check_mergeable, default_out, write_card
from finetune.export.gguf_file import check_quant
from finetune.export.runstage import ExportResult, RunStage

UNVERIFIED = ".unverified"  # suffix of a GGUF file until llama.cpp has verified it


def _config(run: RunStage) -> Any:
    from transformers import AutoConfig

    from finetune.model.gguf_base import base_source

    model = run.recipe.model
    return AutoConfig.from_pretrained(base_source(model), revision=model.revision,
                                      trust_remote_code=model.trust_remote_code)


def check_gguf_export(run: RunStage, quant: str, verify: bool, merge_into: str = "dequantized") -> tuple[Any, Any]:
    """Everything that can be refused before a model loads. Returns the base config and the stage's tokenizer."""
    from finetune.export.gguf_arch import arch_of
    from finetune.export.gguf_vocab import check_tokenizer
    from finetune.export.llamacpp import require_llama_cpp
    from finetune.model.loading import load_tokenizer

    check_quant(quant)
    check_mergeable(run.adapter, "original" if run.recipe.quantization.mode == "none" else merge_into)
    config = _config(run)
    arch_of(config, f"base model {run.recipe.model.name_or_path}")
    tokenizer = load_tokenizer(run.recipe.model, str(run.tokenizer_dir))
    check_tokenizer(tokenizer, run.tokenizer_dir)
    if verify:
        require_llama_cpp("GGUF verification")
    elif quant == "q4_k_m":
        require_llama_cpp("q4_k_m quantisation (llama.cpp's own quantizer)")
    return config, tokenizer


def _stop_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids]))


def export_gguf(
    run: RunStage,
    out: Path | None = None,
    quant: str = "f16",
    merge_into: str = "dequantized",
    verify: bool = True,
    max_kl: float | None = None,
    verify_samples: int = 16,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> ExportResult:
    """Merge the stage's adapter into its base and write `<out>/<run>-<stage>-<quant>.gguf`, checked by llama.cpp.

    Args:
        run: the finished stage to export (`open_run`).
        out: destination folder (default `<run>/export/<stage>-gguf-<quant>`).
        quant: f32, f16, bf16, q8_0 or q4_k_m.
        merge_into: `dequantized` (QLoRA: the 4-bit weights as training saw them) or `original`.
        verify: load the file with llama.cpp and compare it with the merged model; refuse it above the thresholds.
        max_kl: ceiling on the mean KL per token (default: the quantisation's, `llamacpp.THRESHOLDS`).
        verify_samples: how many held-out conversations to compare on.
        overwrite: replace an existing `out`.
        repo_id: Hub repo the card should name.
    """
    import torch

    from finetune.export.gguf_file import quantize_with_llama_cpp, write_gguf
    from finetune.export.gguf_vocab import build_vocab
    from finetune.export.merge import build_reference, merged_state_dict, save_plain_model

    out = check_out(out or default_out(run, f"gguf-{quant}"), overwrite, run.run_dir)
    config, tokenizer = check_gguf_export(run, quant, verify, merge_into)
    if run.recipe.quantization.mode == "none":
        merge_into = "original"
    name = f"{run.recipe.name}-{run.stage.name}-{quant}.gguf"
    result = ExportResult(out=out, format="gguf", stage=run.stage.name, merge_into=merge_into, dtype=quant)
    with staged_out(out, overwrite, run.run_dir) as tmp:
        reference = build_reference(run.recipe, run.adapter, tokenizer)
        state = merged_state_dict(run.recipe, run.adapter, reference, tokenizer, merge_into, torch.float32)
        stop_ids = _stop_ids(tokenizer, reference.get_base_model().generation_config)
        vocab = build_vocab(tokenizer, run.tokenizer_dir, config.vocab_size,
                            end_of_turn_id=next((i for i in stop_ids if i != tokenizer.eos_token_id), None))
        metadata = {"name": f"{run.recipe.name}-{run.stage.name}", "finetune.run": run.recipe.name,
                    "finetune.stage": run.stage.name, "finetune.merge_into": merge_into}
        # no file carries the .gguf name before llama.cpp has verified it (a kill leaves only `.unverified` files)
        unverified = tmp / f"{name}{UNVERIFIED}"
        first = unverified if quant != "q4_k_m" else tmp / f"{name.replace('q4_k_m', 'f16')}{UNVERIFIED}"
        tensor_types = write_gguf(first, state, config, vocab, quant, metadata)
        if quant == "q4_k_m":
            quantize_with_llama_cpp(first, unverified, quant)
            first.unlink()
        merged_dir = tmp.with_name(f".{out.name}.merged")
        if verify:
            save_plain_model(state, reference, merged_dir, torch.float32, tokenizer)
        del state, reference
        result.gguf = {"file": name, "quant": quant, "tensor_types": tensor_types, "tokenizer_pre": vocab.pre}
        if verify:
            try:
                _verify(run, result, unverified, merged_dir, tokenizer, stop_ids, quant, max_kl, verify_samples)
            finally:
                shutil.rmtree(merged_dir, ignore_errors=True)
        unverified.rename(tmp / name)  # verified, or --no-verify asked for it unverified (export.json says which)
        _write_modelfile(result, tokenizer, vocab, tmp)
        write_card(run, result, tmp, repo_id)
    return result


def _verify(run: RunStage, result: ExportResult, path: Path, merged_dir: Path, tokenizer: Any, stop_ids: list[int],
            quant: str, max_kl: float | None, samples: int) -> None:
    """llama.cpp against the merged float32 transformers model; raises (the caller removes everything) if refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.export.llamacpp import THRESHOLDS, check_gguf, llama_cpp_version, open_gguf
    from finetune.export.verify import Figures, verification_conversations

    conversations, result.verification_source = verification_conversations(run.recipe, run.stage, samples)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    ceiling, floor = THRESHOLDS[quant]
    ceiling = ceiling if max_kl is None else max_kl
    llm = open_gguf(path, n_ctx=min(512, merged.config.max_position_embeddings))
    try:
        check = check_gguf(llm, merged, tokenizer, conversations, stop_ids)
    finally:
        llm.close()
    result.figures["llama.cpp"] = check.figures
    result.gguf.update({"llama_cpp": llama_cpp_version(), "thresholds": {"max_kl": ceiling, "min_top1": floor},
                        "tokenization": check.tokenization, "generation": check.generation})
    problems = check.problems(ceiling, floor)
    if problems:
        raise FinetuneError(
            f"export refused: llama.cpp does not reproduce the merged model closely enough for {quant} "
            f"({'; '.join(problems)}). {Figures(**check.figures).line()}. A coarser quantisation may need a higher "
            "--max-kl; a tokenization or stop-token failure is a conversion problem: please report it with the "
            "run's recipe. Nothing was written."
        )


def _write_modelfile(result: ExportResult, tokenizer: Any, vocab: Any, folder: Path) -> None:
    from finetune.export.modelfile import Untranslatable, modelfile, template_parts
    from finetune.run.files import write_text_atomic

    stops = [vocab.tokens[vocab.special[k]] for k in ("eos", "eot") if k in vocab.special]
    try:
        parts = template_parts(tokenizer)
        write_text_atomic(folder / "Modelfile", modelfile(result.gguf["file"], parts, list(dict.fromkeys(stops))))
        result.gguf["modelfile"] = "Modelfile"
    except Untranslatable as e:
        result.gguf["modelfile"] = None
        result.notes.append(f"no Ollama Modelfile: the chat template cannot be translated to Ollama's Go template "
                            f"({e}); translated are per-message templates such as ChatML, Llama 3 and Phi-3. "
                            "llama.cpp itself reads the chat template stored in the GGUF file")
