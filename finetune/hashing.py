"""Content hashes of files, the one place they are computed. Imports nothing of finetune."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_sha256(path: Path, index: Path | None = None) -> str:
    """sha256 of a (possibly multi-GB) file, read in 4 MiB blocks.

    With `index`, the digest is remembered there by (resolved path, size, mtime), so that hashing the same unchanged
    file again (a GGUF base on every run) costs a `stat`.
    """
    path = Path(path)
    known: dict[str, str] = {}
    key = ""
    if index is not None:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if index.is_file():
            try:
                known = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                known = {}
        if key in known:
            return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    sha = digest.hexdigest()
    if index is not None:
        known[key] = sha
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, index)
    return sha
