"""What `ft train` writes into a run folder, and removing exactly that (`--overwrite`) and nothing else.

A run folder may also hold a user's own files (notes, the run's training data): `--overwrite` deletes only the
entries listed here (or, for runs that recorded it, in `manifest.json` under `written`), never follows a link out of
the folder, never deletes `.lock` (held by the caller across the delete), and refuses a folder that is not a run of
ours.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from finetune.errors import FinetuneError
from finetune.run.files import read_json
from finetune.run.lock import LOCK

RUN_ENTRIES = ("recipe.yaml", "metrics.jsonl", "summary.json", "manifest.json", "tracking.json", "tokenizer",
               "wandb", "tensorboard", "report", "export")
STAGE_ENTRIES = ("adapter", "checkpoints", "summary.json")


def written_entries(stage_names: list[str]) -> list[str]:
    """The top-level names a run with these stages writes (recorded in its manifest)."""
    return [*RUN_ENTRIES, *stage_names]


def is_run_folder(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run written by `ft train` (its summary.json and recipe.yaml)."""
    summary = read_json(Path(run_dir) / "summary.json", None) if (Path(run_dir) / "summary.json").is_file() else None
    return isinstance(summary, dict) and "status" in summary and (Path(run_dir) / "recipe.yaml").is_file()


def _recorded_entries(run_dir: Path) -> list[str]:
    manifest = read_json(run_dir / "manifest.json", None) if (run_dir / "manifest.json").is_file() else None
    if isinstance(manifest, dict) and isinstance(manifest.get("written"), list):
        return [str(n) for n in manifest["written"]]
    try:  # runs from before manifests listed what they wrote: their stages are in recipe.yaml
        stored = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        stages = [s.get("name") for s in stored.get("stages") or [] if isinstance(s, dict)] or ["sft"]
    except (OSError, yaml.YAMLError, AttributeError):
        stages = ["sft"]
    return written_entries([str(s) for s in stages if s])


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, never what it points to
    elif path.is_dir():
        shutil.rmtree(path)


def _plain(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..", LOCK)


def clear_run(run_dir: Path) -> list[str]:
    """Delete what `ft train` wrote in `run_dir` (the caller holds its lock). Returns the names of entries kept.

    Raises:
        FinetuneError: `run_dir` is not a run folder of `ft train`.
    """
    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise FinetuneError(
            f"--overwrite: {run_dir} is not a run folder of `ft train` (no summary.json and recipe.yaml of a run), "
            "so nothing in it is deleted. Point output.dir at a new folder, or move its files away first."
        )
    for name in filter(_plain, _recorded_entries(run_dir)):
        entry = run_dir / name
        if entry.is_dir() and not entry.is_symlink() and name not in RUN_ENTRIES:  # a stage folder: its own files
            for sub in STAGE_ENTRIES:
                _delete(entry / sub)
            for temp in entry.glob(".*"):  # atomic writes' leftovers (.adapter.partial, .summary.json.tmp)
                _delete(temp)
            if not any(entry.iterdir()):
                entry.rmdir()
        elif entry.exists() or entry.is_symlink():
            _delete(entry)
    for temp in run_dir.glob(".*.tmp"):
        _delete(temp)
    if not any(run_dir.iterdir()):  # nothing else was there (and no lock is held in it)
        run_dir.rmdir()
        return []
    kept = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if kept:
        print(f"--overwrite: deleted the run in {run_dir}; kept what `ft train` did not write there: "
              f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}", flush=True)
    return kept


def disk_full(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says the disk is full (errno 28, or torch's "file write failed"), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if getattr(error, "errno", None) == 28 or "No space left on device" in text or "file write failed" in text:
            return error
        error = error.__cause__ or error.__context__
    return None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what unfinished atomic writes left (`.staging/`, `.x.partial/`, `.x.tmp`; a killed export's `.x.merged/`
    and `.x.compare/` models) anywhere in a run folder. Returns what was deleted."""
    removed = []
    for path in sorted(Path(run_dir).rglob(".*"), key=lambda p: len(p.parts)):  # a folder before what it holds
        name = path.name
        if (name == ".staging" or name.endswith((".partial", ".tmp", ".old", ".merged", ".compare"))
                or name.startswith(".trash-")) and (path.exists() or path.is_symlink()):
            _delete(path)
            removed.append(path)
    return removed
