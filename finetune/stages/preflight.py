"""Everything checked before the first training step, and `ft data preview`.

`check_recipe_paths` (run by `ft validate`, `ft train` and `train()`) checks what needs the file system or the
network but no model: every path the recipe names, the model folder's files, every stage's data files (readable,
parsed, the columns of their format, not empty, preference pairs that differ), the chat templates, the fused-kernel
support rules and what the launch lacks. `check_stage_data` (run where the pipeline starts, tokenizer loaded, model
not) tokenizes every stage's data with the checks of `ft data preview`. `run_preview` shows one stage's data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.templates import TEMPLATE_NAMES
from finetune.distributed.plan import environment_problems
from finetune.recipe.checks import check_hub, hub_offline_reason, looks_like_hub_id
from finetune.recipe.gguf_source import gguf_path, gguf_problems
from finetune.recipe.kernel_support import recipe_kernel_problems
from finetune.recipe.schema import Recipe


def check_recipe_paths(recipe: Recipe) -> list[str]:
    """Every path the recipe names exists (or is a reachable/cached Hub id). Returns problems, empty when fine."""
    problems: list[str] = []
    name = recipe.model.name_or_path
    if gguf_path(recipe.model) is not None:
        problems += gguf_problems(recipe.model)  # a GGUF file: present, readable, an architecture transformers reads
    elif not Path(name).exists():
        if looks_like_hub_id(name):
            problems += check_hub(name, recipe.model.revision, "model.name_or_path", "model")
        else:
            problems.append(
                f"model.name_or_path: '{name}' does not exist (resolved against {Path.cwd()}) and is not a Hub id "
                "(OWNER/NAME). Point it at a model folder with config.json and weights."
            )
    else:
        problems += model_folder_problems(recipe)

    stages = recipe.effective_stages()
    seen_data: set[int] = set()
    for i, stage in enumerate(stages):
        data = recipe.stage_data(stage)
        prefix = f"stages[{i}].data" if stage.data is not None else "data"
        if id(data) not in seen_data:
            seen_data.add(id(data))
            for group in ("train", "eval"):
                for j, src in enumerate(getattr(data, group)):
                    key = f"{prefix}.{group}[{j}].path"
                    if Path(src.path).exists():
                        continue
                    if looks_like_hub_id(src.path):
                        problems += check_hub(src.path, src.revision, key, "dataset")
                    else:
                        problems.append(f"{key}: '{src.path}' does not exist (resolved against {Path.cwd()})")
            if data.template not in TEMPLATE_NAMES and not Path(data.template).exists():
                problems.append(
                    f"{prefix}.template: '{data.template}' is neither a template name "
                    f"({', '.join(sorted(TEMPLATE_NAMES))}) nor an existing Jinja file"
                )
            if data.task_eval and not Path(data.task_eval).exists():
                problems.append(f"{prefix}.task_eval: '{data.task_eval}' does not exist")
        for key, value in ((f"stages[{i}].init_from", stage.init_from), (f"stages[{i}].dpo.reference", None)):
            if value not in (None, "previous", "new") and not Path(value).exists():
                problems.append(f"{key}: adapter folder '{value}' does not exist")
        if stage.kind == "dpo" and stage.dpo.reference not in ("sft", "base"):
            ref = Path(stage.dpo.reference)
            if not (ref / "adapter_config.json").exists():
                problems.append(
                    f"stages[{i}].dpo.reference: '{stage.dpo.reference}' is not 'sft', 'base' or an adapter folder "
                    "with adapter_config.json"
                )
        problems += _alignment_paths(i, stage)
    problems += recipe_kernel_problems(recipe)
    problems += environment_problems(recipe)
    problems += check_data_files(recipe)  # read every stage's data (no tokenizer) before anything loads
    return problems


def _alignment_paths(i: int, stage: Any) -> list[str]:
    """kto/grpo reference adapters exist; grpo's python rewards import (their errors name the function)."""
    problems = []
    reference = getattr(getattr(stage, stage.kind, None), "reference", None) if stage.kind in ("kto", "grpo") else None
    if reference not in (None, "sft", "base") and not (Path(reference) / "adapter_config.json").exists():
        problems.append(f"stages[{i}].{stage.kind}.reference: '{reference}' is not 'sft', 'base' or an adapter folder "
                        "with adapter_config.json")
    if stage.kind == "grpo":
        from finetune.errors import FinetuneError
        from finetune.stages.rewards import load_function

        for j, spec in enumerate(stage.grpo.rewards):
            if spec.kind == "python":
                try:
                    load_function(spec.function)
                except FinetuneError as e:
                    problems.append(f"stages[{i}].grpo.rewards[{j}].function: {e}")
    return problems


def model_folder_problems(recipe: Recipe) -> list[str]:
    """What a local `model.name_or_path` lacks to load as we load it: a folder, config.json, safetensors weights
    (never pickles), and no custom code unless `model.trust_remote_code` is on."""
    import json

    folder = Path(recipe.model.name_or_path)
    key = f"model.name_or_path: '{folder}'"
    if not folder.is_dir():
        return [f"{key} is a file, not a model folder; point it at the folder that holds config.json and the "
                "*.safetensors weights (or at a Hub id, OWNER/NAME)"]
    if not (folder / "config.json").exists():
        return [f"{key} has no config.json; is it a transformers model folder?"]
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            return [f"{key} holds only pickle weights ({', '.join(pickles[:3])}): we load safetensors only, since "
                    "loading a pickle can run code. Convert them where you trust the file (load the model with "
                    "transformers, then save_pretrained(..., safe_serialization=True)) and point the recipe there."]
        return [f"{key} has config.json but no weights (no *.safetensors file); copy the model's weights there"]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{key}: config.json cannot be read as JSON ({e})"]
    if isinstance(config, dict) and config.get("auto_map") and not recipe.model.trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            return [f"{key}: its architecture ('{config.get('model_type')}') exists only as custom Python code in "
                    "the model folder (config.json auto_map), which runs when it loads. Read that code, then set "
                    "model.trust_remote_code: true if you trust it."]
    return []


def _stage_sources(recipe: Recipe):
    """(stage, data section, recipe key of the section) of each stage, as the stages will read them."""
    for i, stage in enumerate(recipe.effective_stages()):
        yield stage, recipe.stage_data(stage), f"stages[{i}].data" if stage.data is not None else "data"


def check_data_files(recipe: Recipe) -> list[str]:
    """Every stage's local data files read, parsed and normalised to the stage's format, without a tokenizer.

    Catches unreadable files, bad encodings, parse errors, empty files, columns that fit no format (or not the
    stage's), and preference pairs whose answers are identical. Hub and save_to_disk sources are left to training.
    """
    from finetune.data import formats
    from finetune.data.build import normalised_rows
    from finetune.data.cache import checked_marker, mark_checked
    from finetune.data.readers import is_saved_dataset, read_source
    from finetune.errors import FinetuneError

    problems: list[str] = []
    seen: set[tuple[int, str]] = set()
    for stage, data, prefix in _stage_sources(recipe):
        if (id(data), stage.kind) in seen:
            continue
        seen.add((id(data), stage.kind))
        for group in ("train", "eval"):
            if group == "train" and data.streaming:  # read lazily while training, never whole
                continue
            for j, src in enumerate(getattr(data, group)):
                path = Path(src.path)
                if not path.exists() or is_saved_dataset(path):
                    continue
                key = f"{prefix}.{group}[{j}]"
                try:
                    marker = checked_marker(data, src, stage.kind, key)
                    if marker is not None and marker.exists():
                        print(f"[preflight] {key} ({src.path}): unchanged since it last passed these checks "
                              "(same content hash), not read again", flush=True)
                        continue
                    table = read_source(src, key)
                    formats.apply_columns(table, src.columns)
                    fmt, _ = formats.resolve_format(table, src.format)
                    normalised_rows(table, fmt, stage.kind, key, src)
                except FinetuneError as e:
                    problems.append(f"stage {stage.name}: {e}")
                    continue
                if marker is not None:
                    mark_checked(marker)
    return problems


def data_checked(recipe: Recipe) -> str:
    """What `check_data_files` covered, for `ft validate` to say."""
    files = {src.path for _, data, _ in _stage_sources(recipe) for src in (*data.train, *data.eval)
             if Path(src.path).exists()}
    stages = recipe.effective_stages()
    return (f"the data of {len(stages)} stage{'s' * (len(stages) > 1)} ({len(files)} local source"
            f"{'s' * (len(files) != 1)}) read and checked without a tokenizer: readable, parsed, the columns of its "
            "format, not empty, preference answers that differ; tokens, templates and masks are checked by "
            "`ft train` before the first step and by `ft data preview`")


def check_stage_data(recipe: Recipe, tokenizer: Any, stages: list[Any]) -> list[str]:
    """Every split of the given stages tokenized with its chat template and checked as `ft data preview` checks it
    (end-of-turn tokens trained, pad distinct, rows that cannot be encoded or trained on, named by file and line).

    Returns the problems (empty when fine); prints one line per split checked. The tokenizer keeps the chat template
    of the last stage checked: apply the one you need afterwards.
    """
    import contextlib
    import io

    from finetune.data.build import prepare
    from finetune.data.preview import checks
    from finetune.data.templates import apply_template
    from finetune.errors import FinetuneError

    problems: list[str] = []
    for stage in stages:
        data = recipe.stage_data(stage)
        for split in ("train", "eval"):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the stage prints these notices when it starts
                    template = apply_template(tokenizer, data)
                    prepared = prepare(data, tokenizer, stage.kind, recipe.stage_training(stage).seed, split)
            except FinetuneError as e:
                problems.append(f"stage {stage.name} ({split} data): {e}")
                continue
            if prepared is None:
                continue
            failed = [text for ok, text in checks(prepared.report, tokenizer, template) if not ok]
            problems += [f"stage {stage.name} ({split} data): {text}" for text in failed]
            print(f"[preflight] stage {stage.name}, {split} data: {prepared.report.samples} "
                  f"{'pairs' if stage.kind == 'dpo' else 'samples'}, {'FAILED' if failed else 'checks passed'}",
                  flush=True)
    return problems


def refuse_finished_run(recipe: Recipe, from_stage: str | None = None) -> None:
    """Refuse to start over a finished run without `--overwrite` or `--from-stage`: decided from summary.json alone,
    before torch is imported, so the refusal is immediate.

    Raises:
        FinetuneError: The run folder holds a finished run and the recipe does not say to overwrite it.
    """
    import json

    from finetune.errors import FinetuneError

    run_dir = recipe.output_dir()
    try:
        status = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return
    if status == "finished" and from_stage is None and not recipe.output.overwrite:
        raise FinetuneError(
            f"{run_dir} already holds a finished run. Pass --from-stage NAME to rerun from a stage, --overwrite "
            "(or output.overwrite: true) to replace the whole run, or change output.dir / name."
        )


def hub_warning(recipe: Recipe) -> str | None:
    """A warning, before training, when the recipe asks for an upload that is bound to fail now (None when fine)."""
    if recipe.hub.repo_id is None:
        return None
    reason = hub_offline_reason()
    if reason is not None:
        return f"hub.repo_id is set but the Hub cannot be reached ({reason}); the upload after training will fail"
    from huggingface_hub import get_token

    if get_token() is None:
        return "hub.repo_id is set but no Hugging Face token is configured (HF_TOKEN or `hf auth login`)"
    return None


def run_preview(recipe: Any, n: int = 3, stage: str | None = None, split: str = "train",
                color: bool | None = None) -> bool:
    """Print the preview of one stage's data (the first stage by default); True when every check passed."""
    import sys

    import typer

    from finetune.data.build import prepare
    from finetune.data.preview import preview_lines
    from finetune.data.templates import apply_template
    from finetune.errors import FinetuneError
    from finetune.model.loading import load_tokenizer

    stages = recipe.effective_stages()
    chosen = next((s for s in stages if s.name == stage), None) if stage else stages[0]
    if chosen is None:
        raise FinetuneError(f"--stage {stage}: the recipe has no such stage (stages: "
                            f"{', '.join(s.name for s in stages)})")
    if split not in ("train", "eval"):
        raise FinetuneError(f"--split {split}: choose train or eval")
    data = recipe.stage_data(chosen)
    tokenizer = load_tokenizer(recipe.model)
    template = apply_template(tokenizer, data)
    prepared = prepare(data, tokenizer, chosen.kind, recipe.stage_training(chosen).seed, split)
    if prepared is None:
        raise FinetuneError(f"stage {chosen.name} has no {split} data (set data.eval or data.eval_fraction)")
    typer.echo(f"stage {chosen.name} ({chosen.kind}), {split} split")
    color = sys.stdout.isatty() if color is None else color
    lines, ok = preview_lines(prepared, tokenizer, template, n, data.max_length, color)
    for line in lines:
        typer.echo(line, color=color)  # click strips colour off a non-terminal unless told
    return ok
