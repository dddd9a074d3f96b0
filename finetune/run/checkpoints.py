"""Resumable checkpoints that a crash cannot corrupt, and finding the one to resume from.

transformers 5.x writes `checkpoint-N/` in place: adapter, optimizer, scheduler, RNG state, then `trainer_state.json`.
A crash half-way leaves a folder with the right name and half the files, and `get_last_checkpoint` would pick it.
Here each checkpoint is built under `checkpoints/.staging/`, flushed to disk, and renamed to `checkpoints/checkpoint-N`
in one step; only then are checkpoints beyond `training.save_total_limit` removed (oldest first). A `checkpoint-N`
folder is therefore always complete, and the previous one survives any crash while the next is being written.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from finetune.errors import FinetuneError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"


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


def make_atomic(trainer) -> None:
    """Make this trainer instance write every checkpoint under a temporary name and rename it when complete.

    The trainer's own `_save_checkpoint` does the writing (so the folder stays exactly what
    `train(resume_from_checkpoint=...)` reads); only the folder it writes into is redirected to the staging area.
    Multi-process runs keep transformers' own behaviour: every rank writes into the same folder.
    """
    if getattr(trainer.args, "world_size", 1) > 1:
        return
    root = Path(trainer.args.output_dir)
    keep = trainer.args.save_total_limit or 0
    write_in_place = trainer._save_checkpoint

    def save_checkpoint(model, trial=None) -> None:
        staging = root / STAGING
        if staging.exists():  # leftovers of a crash while writing
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        trainer._get_output_dir = lambda trial=None: str(staging)
        try:
            write_in_place(model, trial)
        finally:
            del trainer._get_output_dir  # back to the class method
        name = f"checkpoint-{trainer.state.global_step}"
        built = staging / name
        if not (built / "trainer_state.json").exists():
            raise FinetuneError(
                f"the checkpoint was not written to {built} as expected; this transformers version saves checkpoints "
                "differently from the one finetune was tested with"
            )
        _fsync_tree(built)
        final = root / name
        if final.exists():  # the same step saved by an earlier attempt: replace it
            _remove(final)
        os.replace(built, final)
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        rotate(root, keep)

    trainer._save_checkpoint = save_checkpoint


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
