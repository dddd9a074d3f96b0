"""Where an export goes: `--out` checked before any work (`check_out`), and the export written into a locked
temporary folder beside it that replaces `out` only when complete (`staged_out`).

`--overwrite` replaces only one of our exports; leftovers of a killed export are removed by the next export to the
same place, while the temporary folder of a live one is never touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.run.folder import is_run_folder


def check_out(out: Path, overwrite: bool, run_dir: Path) -> Path:
    """The export's destination as an absolute path, or one line saying why it cannot be used (before any work).

    `--overwrite` replaces only one of our exports (a folder with export.json) that holds no run folder; a folder
    holding the source run or any other run, a link and a file are refused, naming what is there.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))  # `--out .` has a name (and a parent) only once absolute
    if out.is_symlink():
        raise FinetuneError(f"--out {out} is a link; name the folder itself, or choose another --out")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file, not a folder (an export is a folder); choose another --out")
    if not out.is_dir():
        return out
    source = Path(run_dir).resolve()
    if source == out.resolve() or out.resolve() in source.parents:
        raise FinetuneError(f"--out {out} holds the run being exported ({run_dir}), so it is never replaced; choose "
                            "another --out (the default is RUN/export/STAGE-FORMAT)")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out  # an empty folder: nothing to lose
    if not overwrite:
        raise FinetuneError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    runs = [str(p.parent.relative_to(out) or ".") for p in out.rglob("summary.json") if is_run_folder(p.parent)]
    if runs or not (out / "export.json").is_file():
        what = (f"run folder(s) {', '.join(runs[:4])}" if runs else
                f"{len(entries)} entries ({', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}) and no "
                "export.json")
        raise FinetuneError(f"--overwrite replaces only an export written by `ft export` (a folder with export.json "
                            f"and no run in it); {out} holds {what}. Nothing was deleted: choose another --out, "
                            "or move that folder away first")
    return out


def _leftovers(out: Path) -> list[Path]:
    """What an export to `out` writes beside it while it works (removed when it ends, or by the next export)."""
    return [out.with_name(f".{out.name}.{what}") for what in ("partial", "merged", "compare", "old")]


@contextmanager
def staged_out(out: Path, overwrite: bool, run_dir: Path) -> Iterator[Path]:
    """A fresh, locked temporary folder next to `out`, moved into place when the block ends without error.

    Leftovers of an export that was killed (its folders beside `out`: a half-written or unverified export, the merged
    float32 model of a GGUF verification) are removed first; the temporary folder stays locked (flock) while the
    export works, so a second export to the same `out` is refused instead of deleting the first one's work.
    """
    out = check_out(out, overwrite, run_dir)
    tmp = _leftovers(out)[0]
    try:
        if tmp.exists():  # a live export holds its lock; a killed one's folder is free
            os.close(_lock_dir(tmp, f"{out} is being written by another `ft export` ({tmp.name} is locked); wait "
                                    "for it"))
        for path in _leftovers(out):  # nobody holds them: a killed export's
            shutil.rmtree(path, ignore_errors=True)
        tmp.mkdir(parents=True)
    except FileExistsError:
        raise FinetuneError(f"{out} is being written by another `ft export`; wait for it") from None
    except OSError as e:
        raise FinetuneError(f"--out {out}: cannot create its folder ({e.strerror}); choose another --out") from None
    fd = _lock_dir(tmp, f"{out} is being written by another `ft export`; wait for it")
    try:
        yield tmp
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _lock_dir(path: Path, busy: str) -> int:
    """An open descriptor of folder `path` holding its exclusive flock (closing it releases), else FinetuneError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FinetuneError(busy) from None
    return fd


def _finish_out(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old export (checked by `check_out`) is set aside and deleted only
    once the new one is in place."""
    old = _leftovers(out)[3]
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
