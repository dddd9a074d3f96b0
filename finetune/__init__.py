"""finetune: LoRA / QLoRA fine-tuning of causal LMs (SFT, then DPO) from one recipe, from the shell or from Python.

    from finetune import Recipe, train

    run = train(Recipe.from_yaml("recipes/quickstart.yaml", ["training.max_steps=20"]))
    run.adapter()                      # folder of the last stage's LoRA adapter
    run.metrics()                      # every logged step: loss, learning rate, grad norm, eval loss...
    run.stages["sft"]["metrics"]       # what the stage measured (train loss, held-out task before/after...)

`train` runs the same code as `ft train`: the same checks before any model loads, the same run folder, the same
result. Importing this package is cheap; torch and transformers load when `train` runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.errors import FinetuneError
    from finetune.recipe.loading import RecipeError
    from finetune.recipe.schema import Recipe
    from finetune.stages.pipeline import RunResult

__all__ = ["FinetuneError", "Recipe", "RecipeError", "RunResult", "train"]

# Name -> module, imported on first use so that `import finetune` stays light (no torch).
_LAZY = {
    "Recipe": "finetune.recipe.schema",
    "RecipeError": "finetune.recipe.loading",
    "FinetuneError": "finetune.errors",
    "RunResult": "finetune.stages.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute '{name}'")


def train(
    recipe: Recipe | str | Path,
    overrides: list[str] | None = None,
    *,
    overwrite: bool | None = None,
    from_stage: str | None = None,
    nproc: int | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    allow_changed_data: bool = False,
) -> RunResult:
    """Run every stage of a recipe into its run folder, exactly as `ft train` does, and return the run.

    Args:
        recipe: a `Recipe` (loaded with `Recipe.from_yaml` or built in Python) or the path of a recipe file.
        overrides: `key=value` overrides, as `ft train --set` (`["training.max_steps=20", "lora.r=8"]`).
        overwrite: replace a run folder that holds a finished run (None: as the recipe's `output.overwrite` says).
        from_stage: rerun from this stage on, even if it finished.
        nproc: train data-parallel in this many processes (`ft train --nproc`). They print to the terminal that
            started Python (in Jupyter: the server's console), not to the notebook.
        resume: continue the run's unfinished stage from its last intact checkpoint (`ft train --resume`).
        resume_from: resume from this checkpoint of the unfinished stage (`checkpoint-N` or its path); implies resume.
        allow_changed_data: resume although the data files or the base model changed since the run started.

    Returns:
        The run: `run_dir`, `stages` (each stage's summary: adapter folder and metrics), `adapter()`, `metrics()`.

    Raises:
        RecipeError: the recipe is invalid or names files that do not exist (every problem listed).
        FinetuneError: a problem found while running (bad data rows, a finished run in the way...).
    """
    from finetune.errors import FinetuneError, in_python_terms
    from finetune.recipe.loading import RecipeError, apply_override, mark_override
    from finetune.recipe.schema import Recipe, load_recipe, validate_data
    from finetune.stages.preflight import check_recipe_paths

    recipe_path: Path | None = None
    if isinstance(recipe, (str, Path)):
        recipe_path = Path(recipe)
        loaded = load_recipe(recipe_path, overrides or [])
    elif isinstance(recipe, Recipe):
        data = recipe.model_dump(mode="json", exclude_unset=True)
        lines: dict[tuple, Any] = {}
        for assignment in overrides or []:
            mark_override(lines, apply_override(data, assignment), assignment)
        loaded = validate_data(data, "recipe", lines) if overrides else recipe.model_copy(deep=True)
    else:
        raise TypeError(f"train() takes a Recipe or the path of a recipe file, not {type(recipe).__name__}")
    if overwrite is not None:
        loaded.output.overwrite = overwrite
    if problems := check_recipe_paths(loaded):
        raise RecipeError(str(recipe_path or "recipe"), problems)
    try:
        return run_recipe(loaded, recipe_path=recipe_path, from_stage=from_stage, resume=resume, nproc=nproc,
                          resume_from=resume_from, allow_changed_data=allow_changed_data)
    except FinetuneError as e:  # the messages name `ft train` flags; here the keyword arguments are what to use
        e.args = (in_python_terms(str(e)), *e.args[1:])
        raise


def run_recipe(recipe: Recipe, *, recipe_path: str | Path | None = None, from_stage: str | None = None,
               resume: bool = False, nproc: int | None = None, launch_args: list[str] | None = None,
               resume_from: str | None = None, allow_changed_data: bool = False) -> RunResult:
    """The one orchestration behind `ft train` and `train()`, on a recipe already loaded and checked.

    With `nproc` > 1 it starts that many processes, each running `ft launch_args` (default: `ft train` on the resolved
    recipe written to a temporary file), and reads the run back from disk. Otherwise it runs the stages here, then,
    when the recipe names `hub.repo_id`, exports the last stage and uploads it (the export stays on disk if the
    upload fails).
    """
    from finetune.recipe.loading import RecipeError
    from finetune.stages.preflight import refuse_finished_run
    from finetune.stages.reward_code import reward_code_problems

    if problems := reward_code_problems(recipe):  # user code runs only when the recipe (or --allow-code) says so
        raise RecipeError(str(recipe_path or "recipe"), problems)
    if nproc is not None and nproc > 1:
        extra = (["--resume-from", resume_from] if resume_from else []) + (
            ["--allow-changed-data"] if allow_changed_data else [])
        return _train_in_processes(recipe, nproc, from_stage, resume, launch_args, extra)
    if not resume:
        refuse_finished_run(recipe, from_stage)  # at once: the pipeline imports torch, which takes seconds
    from finetune.distributed.process import is_main_process, silence_other_processes
    from finetune.stages.pipeline import run_pipeline

    silence_other_processes()
    run = run_pipeline(recipe, recipe_path=recipe_path, from_stage=from_stage, resume=resume,
                       allow_changed_data=allow_changed_data, resume_from=resume_from)
    if recipe.hub.repo_id and is_main_process():
        from finetune.export.hub import upload_run

        print(f"[hub] uploaded: {upload_run(recipe, run.run_dir)}", flush=True)
    return run


def _train_in_processes(recipe: Recipe, nproc: int, from_stage: str | None, resume: bool,
                        launch_args: list[str] | None, extra: list[str]) -> RunResult:
    """`ft train --nproc N`: checked once here, then the same command runs in each process; the run is read back."""
    from finetune.distributed.launch import relaunch
    from finetune.distributed.plan import environment_problems
    from finetune.recipe.loading import RecipeError, dump_recipe
    from finetune.stages.pipeline import RunResult

    if problems := environment_problems(recipe, nproc):
        raise RecipeError("recipe", problems)
    if launch_args is not None:  # `ft train --nproc N`: each process runs the same command line, minus --nproc
        relaunch(nproc, launch_args)
        summary = recipe.output_dir() / "summary.json"
        return RunResult.from_dir(recipe.output_dir()) if summary.exists() else RunResult(run_dir=recipe.output_dir())
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        path = Path(tmp) / f"{recipe.name}.yaml"
        path.write_text(dump_recipe(recipe), encoding="utf-8")
        args = ["train", str(path)] + (["--from-stage", from_stage] if from_stage else [])
        args += (["--resume"] if resume else []) + extra
        relaunch(nproc, args + (["--overwrite"] if recipe.output.overwrite else []))
    return RunResult.from_dir(recipe.output_dir())
