"""Everything checked before the first training step, and `ft data preview`.

`check_recipe_paths` (run by `ft validate`, `ft train` and `train()`) checks what needs the file system or the
network but no model: every path the recipe names, the chat templates, the fused-kernel support rules and what the
launch lacks. `run_preview` shows one stage's data as the tokenizer sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.templates import TEMPLATE_NAMES
from finetune.distributed.plan import environment_problems
from finetune.recipe.checks import check_hub, hub_offline_reason, looks_like_hub_id
from finetune.recipe.kernel_support import recipe_kernel_problems
from finetune.recipe.schema import Recipe


def check_recipe_paths(recipe: Recipe) -> list[str]:
    """Every path the recipe names exists (or is a reachable/cached Hub id). Returns problems, empty when fine."""
    problems: list[str] = []
    name = recipe.model.name_or_path
    if not Path(name).exists():
        if looks_like_hub_id(name):
            problems += check_hub(name, recipe.model.revision, "model.name_or_path", "model")
        else:
            problems.append(
                f"model.name_or_path: '{name}' does not exist (resolved against {Path.cwd()}) and is not a Hub id "
                "(OWNER/NAME). Point it at a model folder with config.json and weights."
            )
    elif Path(name).is_dir() and not (Path(name) / "config.json").exists():
        problems.append(f"model.name_or_path: '{name}' has no config.json; is it a transformers model folder?")

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
