"""Resumable checkpoints that a crash cannot corrupt, and finding the one to resume from.

transformers 5.x writes `checkpoint-N/` in place: adapter, optimizer, scheduler, RNG state, then `trainer_state.json`.
A crash half-way leaves a folder with the right name and half the files, and `get_last_checkpoint` would pick it.
Here each checkpoint is built under `checkpoints/.staging/`, flushed to disk, and renamed to `checkpoints/checkpoint-N`
in one step; only then are checkpoints beyond `training.save_total_limit` removed (oldest first). A `checkpoint-N`
folder is therefore always complete, and the previous one survives any crash while the next is being written.

Each checkpoint also holds `finetune_state.json`: the sha256 of every file in it (so that a checkpoint damaged later,
on disk or by hand, is noticed before resuming and the previous one is used) and the sum of the training losses up
to its step (so that a resumed stage reports the mean loss over all its steps, not over the resumed ones). That sum
reads two private Trainer attributes, `_total_loss_scalar` and `_tr_loss` (transformers 5.x; tested with the pinned
version by tests/integration/test_runsafe.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.hashing import file_sha256

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
STATE = "finetune_state.json"


def checkpoint_step(path: Path) -> int:
    """The optimizer step of a `checkpoint-N` folder."""
    match = CHECKPOINT.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder")
    return int(match.group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first (staging and trash folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted((p for p in found if (p / "trainer_state.json").exists()), key=checkpoint_step)


def last_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(folder: Path) -> None:
    # Rename is atomic, but without fsync a power cut may persist the rename before the file contents.
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder by first renaming it away, so no half-deleted folder ever carries a checkpoint name."""
    trash = folder.with_name(f".trash-{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def tidy(root: Path) -> None:
    """Remove what interrupted writes and rotations left under `root` (`.staging/`, `.trash-checkpoint-N/`)."""
    root = Path(root)
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith((STAGING, ".trash-")):
                shutil.rmtree(child, ignore_errors=True)


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE}


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing or changed since it was written), or None."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    try:
        recorded = json.loads((folder / STATE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return None  # written before checksums were recorded: nothing to compare with
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE} is unreadable"
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match the checksum recorded when it was written"
    return None


def loss_sum(folder: Path) -> float | None:
    """The sum of the per-step training losses up to a checkpoint's step, when it was recorded."""
    try:
        return float(json.loads((Path(folder) / STATE).read_text(encoding="utf-8"))["loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rotate(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints under `root`."""
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _remove(old)


def clear(root: Path) -> None:
    """Remove every checkpoint (and leftovers of interrupted writes) under `root`: a stage that starts over."""
    root = Path(root)
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and (CHECKPOINT.match(child.name) or child.name.startswith((STAGING, ".trash-"))):
                shutil.rmtree(child)


FAULT = "FINETUNE_FAULT_CHECKPOINT"  # tests: "STEP" or "STEP:RANK", that process exits in the middle of that write


def make_atomic(trainer, loss_base: float = 0.0) -> None:
    """Make this trainer instance write every checkpoint under a temporary name and rename it when complete.

    The trainer's own `_save_checkpoint` does the writing (so the folder stays exactly what
    `train(resume_from_checkpoint=...)` reads); only the folder it writes into is redirected to the staging area,
    and `finetune_state.json` (checksums, loss sum) is added. `loss_base`: the loss sum of the checkpoint this
    training call resumed from. With several processes every one writes its part (its RNG state; the shards of an
    FSDP/ZeRO-3 optimizer) into the same staging folder, and the main process renames it once all have finished
    (a barrier before and after), so a kill of any process during the write leaves the previous checkpoint the newest.
    """
    root = Path(trainer.args.output_dir)
    keep = trainer.args.save_total_limit or 0
    write_in_place = trainer._save_checkpoint
    several = getattr(trainer.args, "world_size", 1) > 1
    main = trainer.is_world_process_zero()

    def wait() -> None:
        if several:
            trainer.accelerator.wait_for_everyone()

    def save_checkpoint(model, trial=None) -> None:
        staging = root / STAGING
        if main:
            if staging.exists():  # leftovers of a crash while writing
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        wait()  # nobody writes into a staging folder that is about to be removed
        trainer._get_output_dir = lambda trial=None: str(staging)
        try:
            write_in_place(model, trial)
            _fault_hook(trainer.state.global_step, trainer.args.process_index)
        finally:
            del trainer._get_output_dir  # back to the class method
        wait()  # every process's files are in the staging folder
        if main:
            _publish(trainer, staging, root, keep, loss_base)
        wait()  # the checkpoint exists for every process when its save returns

    trainer._save_checkpoint = save_checkpoint


def _fault_hook(step: int, rank: int) -> None:
    """Exit this process half-way through a checkpoint's write when the FINETUNE_FAULT_CHECKPOINT test hook says so:
    the model, optimizer and RNG files are in the staging folder, nothing is renamed yet."""
    want = os.environ.get(FAULT, "")
    if want:
        fault_step, _, fault_rank = want.partition(":")
        if int(fault_step) == step and int(fault_rank or 0) == rank:
            print(f"{FAULT}: process {rank} exits while writing checkpoint-{step}", file=sys.stderr, flush=True)
            os._exit(70)


def _publish(trainer, staging: Path, root: Path, keep: int, loss_base: float) -> None:
    """Check, checksum, flush and rename the checkpoint the trainer wrote under `staging`; rotate old ones."""
    name = f"checkpoint-{trainer.state.global_step}"
    built = staging / name
    if not (built / "trainer_state.json").exists():
        raise FinetuneError(
            f"the checkpoint was not written to {built} as expected; this transformers version saves checkpoints "
            "differently from the one finetune was tested with"
        )
    state = {"files": _checksums(built)}
    if hasattr(trainer, "_total_loss_scalar") and hasattr(trainer, "_tr_loss"):  # else: no sum, HF's train_loss
        state["loss_sum"] = loss_base + trainer._total_loss_scalar + float(trainer._tr_loss.item())
    (built / STATE).write_text(json.dumps(state), encoding="utf-8")
    _fsync_tree(built)
    final = root / name
    if final.exists():  # the same step saved by an earlier attempt: replace it
        _remove(final)
    os.replace(built, final)
    _fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)
    rotate(root, keep)


def schedule_text(training, steps_per_epoch: int | None = None, max_steps: int | None = None) -> str:
    """When checkpoints are written, in words: `every 30 min of training, at the end of each epoch (every 125
    steps) and at the last step (250); the newest 2 are kept`."""
    when = [f"every {training.save_minutes:g} min of training"] if training.save_minutes else []
    when += [f"every {training.save_steps} steps"] if training.save_steps else []
    epoch = f" (every {steps_per_epoch} steps)" if steps_per_epoch else ""
    last = f" ({max_steps})" if max_steps else ""
    return (", ".join(when + [f"at the end of each epoch{epoch}"]) + f" and at the last step{last}; the newest "
            f"{training.save_total_limit} are kept")


def next_checkpoint_step(training, step: int, steps_per_epoch: int | None, max_steps: int) -> int:
    """The step of the next checkpoint not driven by the clock (steps, epoch end or the last step) after `step`."""
    candidates = [max_steps]
    if training.save_steps:
        candidates.append((step // training.save_steps + 1) * training.save_steps)
    if steps_per_epoch:
        candidates.append((step // steps_per_epoch + 1) * steps_per_epoch)
    return min(candidates)


def checkpoint_bytes(trainable_params: int, optimizer: str) -> int:
    """Rough size of one checkpoint: fp32 trainable weights plus the optimizer's state for them."""
    state = 2 if "8bit" in optimizer else (0 if optimizer == "sgd" else 8)  # Adam keeps two moments per weight
    return trainable_params * (4 + state) + (1 << 20)  # + tokenizer, config, trainer state


def check_free_disk(folder: Path, needed: int, what: str) -> None:
    """Raise before training when `folder`'s disk has less than `needed` bytes free (plus a 10% margin)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.1:
        raise FinetuneError(
            f"not enough free disk under {folder}: {what} need about {_size(needed)}, {_size(free)} is free. Free "
            "some space, point output.dir at a larger disk, or lower training.save_total_limit."
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
