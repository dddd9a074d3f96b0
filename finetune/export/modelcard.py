"""The model card (README.md) and `export.json` written into every export.

What a reader needs to trust and reuse the export: base model and revision, data, every stage's metrics, how it was
merged and how well the merge reproduces the trained model, the resolved recipe, the run's lineage (manifest.json,
copied into the export) and the package versions. Nothing local leaks: absolute paths, whole or inside a string,
are reduced to their last component, and secrets are redacted (`finetune.run.records.redact`; the token itself is
never read here).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.model.families import experts_note
from finetune.recipe.checks import looks_like_hub_id
from finetune.run.records import redact

if TYPE_CHECKING:
    from finetune.export.runstage import ExportResult, RunStage

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
            "huggingface_hub", "safetensors")
# An absolute path inside a longer string (`--set model.name_or_path=/home/me/base`); not URLs, not `a/b` ratios.
_EMBEDDED_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.-]+/)+([\w.-]+)")


def public_path(value: str) -> str:
    """A path fit for publishing: absolute (or home-relative) local paths become `<local>/<last part>`."""
    if value.startswith("~") or os.path.isabs(value):
        return f"<local>/{Path(value).name}"
    return value


def public_text(text: str) -> str:
    """`text` with absolute paths inside it shortened and secret-shaped strings (HF, OpenAI, W&B keys) redacted."""
    return redact(_EMBEDDED_PATH.sub(r"<local>/\1", text))


def _scrub(value: Any) -> Any:
    """A nested structure fit for publishing: secret-shaped values redacted, local paths shortened in every string.

    The rule is `finetune.run.records.redact`, the same as for manifest.json and W&B: credential-named keys and
    token-shaped values (HF, OpenAI, W&B, 40 hex digits outside commit/revision keys) become `<redacted>`.
    """
    return _short_paths(redact(value))  # the key-aware rule: commits under `commit` / `revision` keys stay


def _short_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _short_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_paths(v) for v in value]
    if isinstance(value, str):
        return _EMBEDDED_PATH.sub(r"<local>/\1", public_path(value))  # tokens: already redacted by `redact`
    return value


def public_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest.json (lineage: recipe hash, data hashes, base model commit, code, seeds), made public."""
    from finetune.run.manifest import read_manifest

    manifest = read_manifest(run_dir)
    return _scrub(manifest) if manifest else None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shaped the export."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def public_base(run: RunStage) -> str | None:
    """The Hub id of the run's base model: `model.name_or_path` when it is one, else `model.hub_id` (None: only a
    local folder is known)."""
    name = run.recipe.model.name_or_path
    if looks_like_hub_id(name) and not Path(name).exists():
        return name
    return run.recipe.model.hub_id


def _base_model(run: RunStage) -> tuple[str, str]:
    from finetune.recipe.gguf_source import gguf_path, read_header

    if (gguf := gguf_path(run.recipe.model)) is not None and gguf.is_file():
        header = read_header(gguf)
        where = public_base(run) or public_path(str(gguf))
        return where, (f"a GGUF file ({gguf.name}, {header.quant_type}, {header.architecture}), dequantized to "
                       "full precision for training")
    hub = public_base(run)
    if hub is not None and hub == run.recipe.model.name_or_path:
        return hub, run.recipe.model.revision or "main (not pinned)"
    if hub is not None:
        return hub, f"local copy ({public_path(run.recipe.model.name_or_path)}); revision not recorded"
    return public_path(run.recipe.model.name_or_path), "local folder"


def export_metadata(run: RunStage, result: ExportResult) -> dict[str, Any]:
    """Machine-readable facts about an export (`export.json`): `ft generate` and tools read this."""
    base, revision = _base_model(run)
    return _scrub({
        "format": result.format,
        "run": run.recipe.name,
        "stage": result.stage,
        "base_model": base,
        "base_revision": revision,
        "quantization": run.recipe.quantization.model_dump(),  # `ft generate` loads an adapter's base the same way
        "merge_into": result.merge_into,
        "dtype": result.dtype,
        "verification": result.figures or None,
        "adapter_effect": result.adapter_effect,
        "verification_source": result.verification_source,
        "gguf": result.gguf,
        # trained on text only: `ft generate` completes raw text with this export by default
        "text_only": bool(run.summary.get("stages", {}).get(result.stage, {}).get("metrics", {}).get("text_only")),
        "versions": package_versions(),
    })


def _stage_rows(run: RunStage) -> list[str]:
    rows = []
    for stage in run.recipe.effective_stages():
        done = run.summary.get("stages", {}).get(stage.name)
        if not done:
            continue
        metrics = done.get("metrics", {})
        for key, value in metrics.items():
            if isinstance(value, dict):  # e.g. task_before / task_after
                inner = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
                rows.append(f"| {stage.name} | {key} | {inner} |")
            else:
                rows.append(f"| {stage.name} | {key} | {_fmt(value)} |")
        if stage.name == run.stage.name:
            break
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _data_lines(run: RunStage) -> list[str]:
    lines = []
    for stage in run.recipe.effective_stages():
        data = run.recipe.stage_data(stage)
        for group in ("train", "eval"):
            for src in getattr(data, group):
                extra = f", at most {src.max_samples} rows" if src.max_samples else ""
                lines.append(f"- `{stage.name}` {group}: `{public_path(src.path)}` (format {src.format}{extra})")
        if data.task_eval:
            lines.append(f"- `{stage.name}` held-out task: `{public_path(data.task_eval)}`")
        if stage.name == run.stage.name:
            break
    return lines


def _merge_section(run: RunStage, result: ExportResult, max_kl: float | None) -> list[str]:
    if result.format == "adapter":
        quant = run.recipe.quantization.mode
        note = (f" It was trained on the {quant.upper()} 4-bit base{experts_note(run.recipe)}: load the base in "
                f"4-bit ({quant}) to reproduce the trained model exactly." if quant != "none" else "")
        return [f"LoRA adapter of stage `{result.stage}`, exactly as trained (not merged).{note}"]
    how = {
        "dequantized": "into the base weights as the adapter saw them in training: each 4-bit weight dequantized "
                       "(bitsandbytes), the LoRA delta added in float32, no requantization",
        "original": "into the original full-precision base weights (peft `merge_and_unload`, float32)"
                    + (", which the adapter never saw during training (it trained on the 4-bit weights)"
                       if run.recipe.quantization.mode != "none" else ""),
    }[result.merge_into or "original"]
    if result.format == "gguf":
        return [f"Adapter of stage `{result.stage}` merged {how}, then written as GGUF `{result.dtype}`.", "",
                *_gguf_lines(result)]
    lines = [f"Adapter of stage `{result.stage}` merged {how}; weights saved as {result.dtype}.", ""]
    if not result.figures:
        return lines + ["Verification was skipped for this export."]
    lines += [
        f"Verification against the trained model (base as in training + adapter) on {result.verification_source}:",
        "",
        "| merge into | max abs logit diff | mean KL (nats/token) | top-1 agreement | tokens |",
        "|---|---|---|---|---|",
    ]
    for mode, f in result.figures.items():
        mark = " (this export)" if mode == result.merge_into else ""
        lines.append(f"| {mode}{mark} | {f['max_abs_logit_diff']:.4g} | {f['mean_kl']:.4g} | "
                     f"{f['top1_agreement']:.2%} | {f['tokens']} |")
    effect = result.adapter_effect
    if effect:
        lines += ["", f"For scale, the adapter itself moves the base model by a mean KL of {effect['mean_kl']:.4g} "
                  f"nats/token (top-1 agreement with the base {effect['top1_agreement']:.2%})."]
    if max_kl is not None:
        lines += ["", f"The export is refused when the mean KL exceeds {max_kl:g}."]
    return lines


def _gguf_lines(result: ExportResult) -> list[str]:
    gguf = result.gguf or {}
    if not result.figures:
        return ["Verification was skipped for this export."]
    f, tok, limits = result.figures["llama.cpp"], gguf["tokenization"], gguf["thresholds"]
    gen = gguf["generation"]
    return [
        f"Checked by llama.cpp itself ({gguf['llama_cpp']}) against the merged float32 transformers model on "
        f"{result.verification_source}:", "",
        f"- token ids of the rendered chat texts identical on {tok['identical']} of {tok['conversations']}",
        f"- next-token logits: mean KL {f['mean_kl']:.4g} nats/token (limit {limits['max_kl']:g}), top-1 agreement "
        f"{f['top1_agreement']:.2%} ({f.get('top1_agreement_decisive', f['top1_agreement']):.2%} without "
        f"{f.get('near_ties', 0)} near ties; limit {limits['min_top1']:.0%}), max abs logit diff "
        f"{f['max_abs_logit_diff']:.4g}"
        f", {f['tokens']} tokens",
        f"- greedy answers ending at the stop token: {sum(g['llama_cpp_stopped'] for g in gen)} of {len(gen)} "
        f"(same tokens as transformers: {sum(g['same_tokens'] for g in gen)} of {len(gen)})",
    ]


def _usage(result: ExportResult, where: str, base: str) -> list[str]:
    if result.format == "gguf":
        file = (result.gguf or {}).get("file", "model.gguf")
        lines = ["```bash", f"llama-cli -m {file} -cnv        # llama.cpp, chat template from the file"]
        if (result.gguf or {}).get("modelfile"):
            lines += ["ollama create my-model -f Modelfile && ollama run my-model"]
        return [*lines, "```"]
    if result.format == "merged":
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        ]
    else:
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        ]
    return ["```python", *code, "```", "", f"Or with this toolkit: `ft generate {where} --prompt \"...\"`"]


def render_card(run: RunStage, result: ExportResult, repo_id: str | None = None, max_kl: float | None = None) -> str:
    """The README.md of an export."""
    base, revision = _base_model(run)
    kinds = [s.kind for s in run.recipe.effective_stages()]
    tags = ["finetune", "lora"] + (["qlora"] if run.recipe.quantization.mode != "none" else []) + sorted(set(kinds))
    front: dict[str, Any] = {"library_name": {"adapter": "peft", "gguf": "gguf"}.get(result.format, "transformers")}
    if (hub := public_base(run)) is not None:
        front["base_model"] = hub
    front.update({"pipeline_tag": "text-generation", "tags": tags})
    from finetune.recipe.loading import dump_recipe

    recipe_yaml = yaml.safe_dump(_scrub(yaml.safe_load(dump_recipe(run.recipe))), sort_keys=False)
    where = repo_id or "path/to/this/folder"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {run.recipe.name} ({result.format})", "",
        f"Fine-tuned from `{base}` (revision: {revision}) with LoRA"
        + (f" on a {run.recipe.quantization.mode.upper()} 4-bit base (QLoRA{experts_note(run.recipe)})"
           if run.recipe.quantization.mode != "none" else "")
        + f"; stages: {', '.join(f'{s.name} ({s.kind})' for s in run.recipe.effective_stages())}. "
        f"This export holds stage `{result.stage}`.", "",
        "## Use", "", *_usage(result, where, base), "",
        "## Export", "", *_merge_section(run, result, max_kl), "", *(f"Note: {note}\n" for note in result.notes),
        "## Data", "", *(_data_lines(run) or ["(none recorded)"]), "",
        "## Training and evaluation metrics", "",
        "| stage | metric | value |", "|---|---|---|", *_stage_rows(run), "",
        "## Recipe", "", "The resolved recipe (every default written out; local paths shortened):", "",
        "```yaml", recipe_yaml.strip(), "```", "",
        *_lineage(run),
        "## Package versions (export)", "",
        *(f"- {name} {version}" for name, version in package_versions().items()), "",
    ]
    return public_text("\n".join(lines))


def _lineage(run: RunStage) -> list[str]:
    from finetune.run.manifest import lineage_lines

    manifest = public_manifest(run.run_dir)
    if manifest is None:
        return []
    try:
        lines = lineage_lines(manifest)
    except (KeyError, TypeError):  # a manifest from another version of the toolkit: the copy is still there
        lines = []
    return ["## Lineage", "", "From the run's manifest.json (a copy is in this folder):", "", *lines, ""]
