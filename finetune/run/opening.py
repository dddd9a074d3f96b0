"""Opening a run folder for `ft train`: the lock first, then the run-folder rules (finished, interrupted, resumed,
overwritten) and any delete under that lock, and the inputs of a resumed run compared with its manifest."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe.loading import dump_recipe
from finetune.recipe.schema import Recipe
from finetune.run.files import read_json
from finetune.run.folder import clear_run
from finetune.run.lock import RunLock
from finetune.run.manifest import build_manifest, input_changes, read_manifest
from finetune.run.resume import check_run_dir, check_writable


def prepare_run_dir(recipe: Recipe, from_stage: str | None = None, resume: bool = False, held: bool = False) -> Path:
    """Create the run folder, refusing to replace a finished run unless the recipe says overwrite.

    With `from_stage`, a finished run is reopened: the stages before it are kept, it and the ones after run again.
    Unfinished runs (resume, checkpoints, locks) follow `finetune.run.resume.check_run_dir`; `held`: the caller holds
    the folder's lock, so that an overwrite cannot race another `ft train`.
    """
    run_dir = recipe.output_dir()
    check_run_dir(run_dir, dump_recipe(recipe), [s.name for s in recipe.effective_stages()],
                  overwrite=recipe.output.overwrite, resume=resume, from_stage=from_stage, held=held)
    summary = read_json(run_dir / "summary.json", {})
    if summary.get("status") == "finished" and (recipe.output.overwrite or from_stage is None):
        if not recipe.output.overwrite:
            raise FinetuneError(
                f"{run_dir} already holds a finished run. Pass --from-stage NAME to rerun from a stage, --overwrite "
                "(or output.overwrite: true) to replace the whole run, or change output.dir / name."
            )
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def open_run_dir(recipe: Recipe, from_stage: str | None, resume: bool) -> tuple[Path, RunLock]:
    """Lock the run folder first, then apply the run-folder rules (and any delete) under that lock."""
    run_dir = recipe.output_dir()
    check_writable(run_dir)
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()  # one writer per run folder; released by the OS on kill -9
    try:
        prepare_run_dir(recipe, from_stage, resume, held=True)
    except BaseException:
        lock.release()
        if fresh and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything was written: leave no empty folder
        raise
    return run_dir, lock


def check_inputs(recipe: Recipe, run_dir: Path, recipe_path, resume: bool, allow_changed_data: bool) -> dict:
    """The run's manifest; a resume whose data or base model changed since the run started is refused."""
    manifest = build_manifest(recipe, recipe_path)
    changes = input_changes(read_manifest(run_dir), manifest) if resume else []
    if changes and not allow_changed_data:
        raise FinetuneError(f"--resume: {run_dir} started on other inputs: {'; '.join(changes)}. Restore them, or "
                            "add --allow-changed-data to continue on the new ones (manifest.json keeps both).")
    for change in changes:
        print(f"[resume] warning: {change}; continuing as --allow-changed-data asks", flush=True)
    return manifest
