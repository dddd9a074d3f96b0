"""The GPU check's evidence: one archive under the output folder with what a failure needs to be diagnosed.

Only a few files come back from a lent GPU machine, so `OUT/evidence.tar.gz` holds the check's log and summary,
every step's result, the per-test results of the kernel tests, and from each training run its log, probe JSON
(per-step times and tokens), per-process records (peak GPU memory), recipe, metrics and summary. Text files only (no
weights, no data); a file over `MAX_FILE` keeps its last `MAX_FILE` bytes (the end of a log is where it failed).
`check.py` rewrites it after every step; `check.sh` once more at the end, with the whole log:

    python scripts/gpu/evidence.py OUT            # WORK is read from OUT/summary.json
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

ARCHIVE = "evidence.tar.gz"
MAX_FILE = 2 * 2**20  # bytes kept of one file (its end)
MAX_TOTAL = 40 * 2**20  # bytes of files before compression; later files are listed as left out
SUFFIXES = (".json", ".jsonl", ".log", ".md", ".yaml", ".txt", ".xml")


def collect(out: Path, work: Path | None) -> list[tuple[str, Path]]:
    """(name in the archive, file) of everything the archive holds, in a stable order."""
    files = [(f"out/{p.name}", p) for p in sorted(out.iterdir()) if p.is_file() and p.name != ARCHIVE
             and p.suffix in SUFFIXES]
    if work is not None and work.is_dir():
        for p in sorted(work.rglob("*")):
            rel = p.relative_to(work)
            if (p.is_file() and not p.is_symlink() and (p.suffix in SUFFIXES or ".json." in p.name)
                    and not {"site", "src", "hf-home", "assets"} & set(rel.parts[:1])
                    and not {"adapter", "checkpoints", "hf-datasets-cache"} & set(rel.parts)
                    and not p.name.startswith(("tokenizer", "vocab", "merges"))):
                files.append((f"work/{rel}", p))
    return files


def pack(out: Path, work: Path | None = None) -> Path:
    """Write `out/evidence.tar.gz` (atomically) and return its path."""
    out = Path(out)
    left_out: list[str] = []
    total = 0
    tmp = out / f".{ARCHIVE}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name, path in collect(out, Path(work) if work else None):
            try:
                size = path.stat().st_size
                with path.open("rb") as f:
                    if size > MAX_FILE:
                        f.seek(size - MAX_FILE)
                        left_out.append(f"{name}: first {size - MAX_FILE} of {size} bytes left out")
                    data = f.read(MAX_FILE)
            except OSError as e:
                left_out.append(f"{name}: {e}")
                continue
            if total + len(data) > MAX_TOTAL:
                left_out.append(f"{name}: over the archive's {MAX_TOTAL} bytes")
                continue
            total += len(data)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
        note = json.dumps({"left_out": left_out, "bytes": total}, indent=1).encode()
        info = tarfile.TarInfo("left_out.json")
        info.size = len(note)
        tar.addfile(info, io.BytesIO(note))
    os.replace(tmp, out / ARCHIVE)
    return out / ARCHIVE


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    summary = out / "summary.json"
    work = json.loads(summary.read_text())["check"].get("work") if summary.exists() else None
    print(f"evidence: {pack(out, Path(work) if work else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
