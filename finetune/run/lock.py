"""The run folder's lock: one `ft train` writes a run folder at a time; the OS drops the lock with the process.

The holder deletes `.lock` when it is done, while still holding it. A process that opened the file just before
that finds, once it gets the lock, that the path no longer leads to the file it locked, and tries again on the new
file; so a removed lock file never lets two writers in. Only a killed process leaves its (unlocked) file behind.
"""

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
        while True:
            self.file = self.path.open("a+")
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.close()
                self.file = None
                raise FinetuneError(f"{self.path.parent} is in use by another `ft train` (pid "
                                    f"{lock_pid(self.path.parent)}); wait for it or stop it first") from None
            if _same_file(self.file, self.path):
                break
            self.file.close()  # the holder removed the file we locked as it finished: lock the current one
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (closing the file releases the flock)."""
        if self.file is not None:
            if _same_file(self.file, self.path):
                self.path.unlink(missing_ok=True)
            self.file.close()
            self.file = None


def _same_file(file, path: Path) -> bool:
    """Whether `path` still names the open `file` (and not a newer file, or nothing)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except OSError:
        return False


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run folder's lock (a `ft train` is writing it)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        f = path.open("r")  # never creates one: asking must not leave a lock file behind
    except OSError:  # removed by its holder meanwhile
        return False
    with f:
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
