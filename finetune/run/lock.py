"""The run folder's lock: one `ft train` writes a run folder at a time; the OS drops the lock with the process.

`ft train` holds it exclusively; `ft export`, `ft eval` and `ft generate` hold it shared while they read a run
(`reading`), so neither starts while the other works: an export never copies weights a retraining is replacing, and
`ft train --overwrite` never deletes a run an export is reading.

The writer deletes `.lock` when it is done, while still holding it (readers leave the file). A process that opened
the file just before that finds, once it gets the lock, that the path no longer leads to the file it locked, and
tries again on the new file; so a removed lock file never lets two writers in. Only a killed writer leaves its
(unlocked) file behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from finetune.distributed.process import is_main_process
from finetune.errors import FinetuneError

LOCK = ".lock"


class RunLock:
    """A lock on `<run>/.lock`: exclusive while `ft train` writes the run folder, shared (`reader`: the command's
    name) while a command reads it.

    The OS drops it when the process ends in any way (kill -9 included), so a held lock means a live process.
    """

    def __init__(self, run_dir: Path, reader: str | None = None):
        self.path = Path(run_dir) / LOCK
        self.reader = reader
        self.file = None

    def acquire(self) -> RunLock:
        """Take the lock or raise FinetuneError naming who holds it (rank 0 only)."""
        if not is_main_process():
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one writer per folder is then up to the user
            return self
        if self.reader is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                self.file = self.path.open("a+")
            except OSError:  # a reader of a folder it may not write: nobody else can write it either
                if self.reader is None:
                    raise
                return self
            try:
                fcntl.flock(self.file.fileno(), (fcntl.LOCK_EX if self.reader is None else fcntl.LOCK_SH)
                            | fcntl.LOCK_NB)
            except OSError:
                readers = self.reader is None and _shared_only(self.file)
                self.file.close()
                self.file = None
                raise FinetuneError(self._busy(readers)) from None
            if _same_file(self.file, self.path):
                break
            self.file.close()  # the writer removed the file we locked as it finished: lock the current one
        if self.reader is None:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(str(os.getpid()))
            self.file.flush()
        return self

    def _busy(self, readers: bool) -> str:
        run = self.path.parent
        if self.reader is not None:
            return (f"{run} is being trained by `ft train` (pid {lock_pid(run)}); `{self.reader}` reads it once that "
                    "has finished: wait for it (`ft runs` shows it) or stop it first")
        if readers:
            return (f"{run} is being read by `ft export`, `ft eval` or `ft generate`; wait for it to finish, or stop "
                    "it first")
        return f"{run} is in use by another `ft train` (pid {lock_pid(run)}); wait for it or stop it first"

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock); the writer removes the lock file first."""
        if self.file is not None:
            if self.reader is None and _same_file(self.file, self.path):
                self.path.unlink(missing_ok=True)
            self.file.close()
            self.file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def reading(run_dir: Path | None, command: str) -> contextlib.AbstractContextManager:
    """Hold `run_dir`'s lock shared while `command` (`ft export`...) reads it; refuses while `ft train` writes it.
    Nothing is locked for None or a path that is not a folder (the caller's own checks say what is wrong)."""
    if run_dir is None or not Path(run_dir).is_dir():
        return contextlib.nullcontext()
    return RunLock(run_dir, reader=command)


def _shared_only(file) -> bool:
    """Whether the lock on `file` that refused an exclusive lock is held by readers only (a shared lock is granted)."""
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_file(file, path: Path) -> bool:
    """Whether `path` still names the open `file` (and not a newer file, or nothing)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except OSError:
        return False


def is_locked(run_dir: Path) -> bool:
    """True while a `ft train` holds the run folder's lock (readers, who hold it shared, do not count)."""
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
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused only while a writer holds it
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
