"""The run folder's lock: one `ft train` writes a run folder at a time; the OS drops the lock with the process."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.distributed.process import is_main_process
from finetune.errors import FinetuneError

LOCK = ".lock"


class RunLock:
    """An exclusive lock on `<run>/.lock`, held while `ft train` writes the run folder.

    The OS drops it when the process ends in any way (kill -9 included), so a held lock means a live writer.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def acquire(self) -> RunLock:
        """Take the lock or raise FinetuneError naming the process that holds it (rank 0 only)."""
        if not is_main_process():
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one writer per folder is then up to the user
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            raise FinetuneError(f"{self.path.parent} is in use by another `ft train` (pid {lock_pid(self.path.parent)})"
                                ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run folder's lock (a `ft train` is writing it)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    with path.open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def lock_pid(run_dir: Path) -> str:
    """The pid written in the run folder's lock file ("?" when unknown)."""
    try:
        return (Path(run_dir) / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"
