"""Runs that survive: the run-folder rules for starting, resuming and overwriting, and the guarded training call.

Every stage trains through `guarded_train(trainer, ctx)` instead of `trainer.train()`. That one call:
- writes checkpoints atomically and keeps the newest `training.save_total_limit` (finetune.run.checkpoints);
- resumes from `ctx.resume_from` (optimizer, scheduler, RNG and data position come back with it) after dropping the
  metrics rows a crash logged past that checkpoint;
- checks there is disk for the checkpoints before the first step;
- on Ctrl-C / SIGTERM finishes the step, saves a checkpoint and raises `RunInterrupted` with the resume command;
- on a NaN or infinite loss raises `TrainingDiverged` naming the step, the last good checkpoint and likely causes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import yaml

from finetune.distributed.process import is_main_process
from finetune.errors import FinetuneError, RunInterrupted
from finetune.run import checkpoints
from finetune.run.files import read_json, write_json_atomic
from finetune.run.folder import clear_run, disk_full, remove_temporaries
from finetune.run.guards import (
    NanGuard,
    NonFinite,
    NoStepPastTheEnd,
    SaveSchedule,
    StopOnSignal,
    TrainingComplete,
    TrainingDiverged,
    catch_signals,
    finished_at_resume,
)
from finetune.run.guards import divergence_message as _divergence_message
from finetune.run.lock import is_locked, lock_pid
from finetune.run.records import read_metrics, redact_text, trim_metrics
from finetune.run.tracking import RunLogger


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir` (with as many processes as this one was part of)."""
    from finetune.distributed.process import world_size

    return f"ft train {run_dir} --resume" + (f" --nproc {world_size()}" if world_size() > 1 else "")


# --------------------------------------------------------------------------------------------------------------
# The run folder: may we write into it, and from where do we continue?


def check_writable(run_dir: Path) -> None:
    """Raise unless `run_dir` can be created and written (checked by writing a probe file, which also catches
    read-only mounts that permission bits do not show)."""
    probe_dir = Path(run_dir)
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    hint = "Set output.dir to a folder you can write to."
    if not probe_dir.is_dir():
        raise FinetuneError(f"output.dir {run_dir}: {probe_dir} is a file, not a folder. {hint}")
    probe = probe_dir / f".ft-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"output.dir {run_dir}: cannot write in {probe_dir} ({e.strerror}). {hint}") from None


def _resolved(recipe_yaml: str) -> dict[str, Any]:
    data = yaml.safe_load(recipe_yaml) or {}
    data.pop("output", None)  # where the run lives and whether to overwrite it are not part of what it trains
    return data


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [prefix or "(root)"]


def recipe_differences(run_dir: Path, recipe_yaml: str) -> list[str]:
    """Keys in which `recipe_yaml` (a resolved recipe) differs from the recipe stored in `run_dir` (output excluded)."""
    stored = Path(run_dir) / "recipe.yaml"
    if not stored.exists():
        return []
    return _differences(_resolved(stored.read_text(encoding="utf-8")), _resolved(recipe_yaml))


def unfinished_stage(run_dir: Path, stage_names: list[str]) -> str | None:
    """The first stage of the run without a `<stage>/summary.json`, or None when all finished."""
    return next((n for n in stage_names if not (Path(run_dir) / n / "summary.json").exists()), None)


def check_run_dir(run_dir: Path, recipe_yaml: str, stage_names: list[str], overwrite: bool, resume: bool,
                  from_stage: str | None, held: bool = False) -> None:
    """The run-folder rules about unfinished runs, applied before anything is written (FinetuneError says what to do).

    - the folder must be writable and not in use by another `ft train`;
    - `resume` needs an unfinished run of the same recipe (output section aside);
    - `overwrite` (without `resume`) starts an unfinished run over: what `ft train` wrote is deleted
      (`finetune.run.folder.clear_run`, which refuses folders that are not runs);
    - an unfinished stage with checkpoints is not restarted silently: `--resume` it or `--overwrite` the run.
    Finished runs (refused without `--overwrite` or `--from-stage`) are handled by
    `finetune.run.opening.prepare_run_dir`.
    `held`: the caller holds the folder's lock (so the delete cannot race another `ft train`).
    """
    run_dir = Path(run_dir)
    check_writable(run_dir)
    if is_main_process() and not held and is_locked(run_dir):
        raise FinetuneError(f"{run_dir} is in use by another `ft train` (pid {lock_pid(run_dir)}); wait for it "
                            "or stop it first")
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else None
    if summary is None:
        if resume:
            raise FinetuneError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
        return
    if summary.get("status") == "finished":
        if resume:
            raise FinetuneError(f"--resume: the run in {run_dir} already finished; nothing to resume")
        return
    if resume:
        changed = recipe_differences(run_dir, recipe_yaml)
        if changed:
            keys = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            raise FinetuneError(
                f"--resume continues {run_dir} with the recipe it started with, and these keys differ: {keys}. Use "
                f"the same recipe and --set values (or `{resume_command(run_dir)}`), or pass --overwrite to start over."
            )
        return
    if overwrite:
        clear_run(run_dir)
        return
    stage = unfinished_stage(run_dir, stage_names)
    saved = checkpoints.last_checkpoint(run_dir / stage / "checkpoints") if stage else None
    if saved is not None and from_stage is None:
        raise FinetuneError(
            f"{run_dir}: stage '{stage}' stopped at step {checkpoints.checkpoint_step(saved)} and has a checkpoint. "
            f"Continue it with `{resume_command(run_dir)}`, or pass --overwrite to start the run over."
        )


def resume_point(stage_dir: Path, resume: bool, choose: str | None = None) -> Path | None:
    """The checkpoint a stage continues from when resuming (else None): `choose` (`checkpoint-N` or a path), or the
    newest one that is intact; a damaged one is passed over with a notice."""
    if not resume:
        return None
    stage, root = Path(stage_dir).name, Path(stage_dir) / "checkpoints"
    found = None
    if choose is not None:
        found = Path(choose) if Path(choose).is_dir() else root / Path(choose).name
        if (not found.is_dir() or found.parent.resolve() != root.resolve()
                or checkpoints.CHECKPOINT.match(found.name) is None):
            have = ", ".join(p.name for p in checkpoints.list_checkpoints(root)) or "none"
            raise FinetuneError(f"--resume-from {choose}: not a checkpoint of stage '{stage}' in {root} (its "
                                f"checkpoints: {have})")
        if problem := checkpoints.verify(found):
            raise FinetuneError(f"--resume-from {choose}: {found} cannot be used: {problem}")
    for candidate in ([] if found else reversed(checkpoints.list_checkpoints(root))):
        if (problem := checkpoints.verify(candidate)) is None:
            found = candidate
            break
        print(f"[{stage}] notice: {candidate.name} is damaged ({problem}); trying the checkpoint before it "
              f"(choose one with --resume-from checkpoint-N)", flush=True)
    if found is not None:
        print(f"[{Path(stage_dir).name}] resuming from {found} (step {checkpoints.checkpoint_step(found)})", flush=True)
    elif Path(stage_dir).exists():  # the stage had started: say why it starts over
        print(f"[{Path(stage_dir).name}] no checkpoint was saved before it stopped; the stage starts over", flush=True)
    return found


# --------------------------------------------------------------------------------------------------------------
# What the summary says when a run stops early


def record_stop(run_dir: Path, summary: dict[str, Any], stage: str, error: BaseException) -> None:
    """Write why a run stopped early into its summary.json (`ft runs` and `ft report` show it)."""
    interrupted = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    summary["status"] = "interrupted" if interrupted else "failed"
    summary["stopped_in"] = stage
    summary["error"] = redact_text(str(error)) or error.__class__.__name__  # an exception may quote a URL's key
    try:
        write_json_atomic(Path(run_dir) / "summary.json", summary)
    except OSError:  # e.g. the disk is still full: the error itself is what the user must see
        pass


# --------------------------------------------------------------------------------------------------------------
# The training call every stage makes


def _run_logger(trainer, ctx) -> RunLogger:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, RunLogger):
            return callback
    logger = RunLogger(ctx.metrics_path, ctx.stage.name)
    trainer.add_callback(logger)
    return logger


def _check_disk(trainer, ctx) -> None:
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    each = checkpoints.checkpoint_bytes(params, ctx.training.optimizer)
    copies = ctx.training.save_total_limit + 1  # +1: the one being written before the oldest is removed
    what = f"{copies} checkpoint(s) of ~{checkpoints._size(each)} and the adapter"
    checkpoints.check_free_disk(ctx.dir, copies * each + params * 4, what)


def guarded_train(trainer, ctx):
    """`trainer.train()` with atomic checkpoints, resume, disk check, graceful interrupts and the NaN guard.

    Args:
        trainer: a transformers/trl Trainer built by the stage (its output_dir is `<stage>/checkpoints`).
        ctx: the StageContext; `ctx.resume_from` is the checkpoint to continue from (None: start the stage fresh)
            and `ctx.tracker` the run's W&B tracker (or None).

    Returns:
        What `trainer.train()` returns.

    Raises:
        RunInterrupted: after SIGINT/SIGTERM, once the checkpoint is saved.
        TrainingDiverged: on a NaN or infinite gradient or loss.
    """
    stage = ctx.stage.name
    root = Path(trainer.args.output_dir)
    resume_from = getattr(ctx, "resume_from", None)
    known = checkpoints.loss_sum(resume_from) if resume_from else None  # read now: rotation may remove it
    loss_base = known or 0.0
    checkpoints.make_atomic(trainer, loss_base)
    if trainer.is_world_process_zero():
        checkpoints.tidy(root)  # a staging or trash folder left by a kill
        if resume_from is None:
            checkpoints.clear(root)  # a stage that starts over must not rotate against an earlier attempt's checkpoints
        after = checkpoints.checkpoint_step(resume_from) if resume_from else 0
        if dropped := trim_metrics(ctx.metrics_path, stage, after, ends=resume_from is not None):
            print(f"[{stage}] dropped {dropped} metrics row(s) of an earlier attempt logged after step {after}")
    _check_disk(trainer, ctx)

    logger = _run_logger(trainer, ctx)
    logger.tracker = getattr(ctx, "tracker", None)
    if resume_from is not None:
        logger.resumed = True
        at = checkpoints.checkpoint_step(resume_from)
        counts = [r["num_tokens"] for r in read_metrics(ctx.metrics_path)
                  if r.get("stage") == stage and r.get("step") == at and "num_tokens" in r]
        logger.token_base = counts[-1] if counts else None
    if ctx.recipe.tracking.tensorboard:
        logger.tensorboard_dir = ctx.run_dir / "tensorboard" / stage
    trainer.add_callback(SaveSchedule(stage, ctx.training))
    stopper = StopOnSignal(stage)
    trainer.add_callback(stopper)
    trainer.add_callback(NanGuard())
    trainer.add_callback(NoStepPastTheEnd())
    try:
        with catch_signals(stopper):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TrainingComplete:  # resumed at the last step (stopped in the final evaluation): nothing left to train
        result = finished_at_resume(trainer, None if known is None else known / max(trainer.state.global_step, 1))
    except NonFinite as e:
        saved = checkpoints.last_checkpoint(root)
        message = _divergence_message(stage, e, str(saved) if saved else None, resume_command(ctx.run_dir),
                                      ctx.training)
        raise TrainingDiverged(message) from None
    finally:
        logger.close()
    if stopper.signum is not None:
        saved = checkpoints.last_checkpoint(root)
        name = signal.Signals(stopper.signum).name
        raise RunInterrupted(
            f"[{stage}] stopped by {name} at step {trainer.state.global_step}; checkpoint saved in {saved}.\n"
            f"Continue with: {resume_command(ctx.run_dir)}",
            exit_code=128 + stopper.signum,
        )
    if known is not None:  # the mean over every step of the stage, not over the resumed ones
        total = loss_base + trainer._total_loss_scalar  # this call's steps (private: see finetune.run.checkpoints)
        result = result._replace(training_loss=total / max(trainer.state.global_step, 1))
    return result


def stop_message(error: BaseException, run_dir: Path, stage: str) -> str | None:
    """One line for a full disk (temporaries removed, the last good checkpoint named), or None for other errors."""
    full = disk_full(error)
    if full is None:
        return None
    remove_temporaries(run_dir)
    last = checkpoints.last_checkpoint(run_dir / stage / "checkpoints")
    what = getattr(full, "filename", None) or f"stage '{stage}' files"
    return (f"[{stage}] disk full while writing {what}; last good checkpoint: {last or 'none'}. Free some space and "
            f"continue with `{resume_command(run_dir)}`")
