"""On-disk cache of preprocessed datasets, keyed by everything the result depends on.

Key: the content hash of every data file (or the Hub dataset's fingerprint), the tokenizer (vocabulary, special
tokens, chat template), the data section of the recipe, the stage kind, split and seed, and `CACHE_VERSION` (bumped
whenever the preprocessing code changes its output). A hit is loaded instead of reading and tokenizing again; a
change to any input is a miss. Entries are written under a temporary name and renamed, so concurrent runs and
crashes never leave a half-written entry behind.

Beside the entries, `checked/` holds an empty file per data source that passed the checks before training
(`finetune.stages.preflight.check_data_files`), keyed by its content hash: an unchanged file is not parsed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune.data.readers import fingerprint
from finetune.recipe.schema import DataConfig, DatasetSource

CACHE_VERSION = 4  # 4: special-token text in messages refused or escaped (data.special_tokens_in_content)
_NOT_IN_KEY = {"task_eval", "task_eval_max_new_tokens", "cache_dir", "num_proc"}  # do not change the preprocessed data


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what tokenization depends on: vocabulary and merges, added and special tokens, chat template."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
             .encode())
    specials = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    h.update(json.dumps([type(tokenizer).__name__, specials, tokenizer.chat_template or ""]).encode())
    return h.hexdigest()


def cache_key(data: DataConfig, sources: list[tuple[str, DatasetSource]], tokenizer: Any, kind: str, split: str,
              seed: int) -> str:
    """The cache key of a preprocessed split (hex digest)."""
    parts = {
        "version": CACHE_VERSION,
        "kind": kind,
        "split": split,
        "seed": seed,
        "data": data.model_dump(mode="json", exclude=_NOT_IN_KEY),
        "files": [fingerprint(src, key) for key, src in sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def load(root: Path, key: str) -> tuple[Any, dict[str, Any]] | None:
    """(dataset, report) of a cached entry, or None on a miss. SFT samples stay memory-mapped (the SFT trainer is
    told not to prepare them again, so nothing writes into the cache folder); the alignment stages' message rows,
    which their trainers map over, are read into memory so that those maps never write files into it."""
    entry = root / key
    if not (entry / "report.json").exists():
        return None
    from datasets import load_from_disk

    try:
        report = json.loads((entry / "report.json").read_text())
        return load_from_disk(str(entry), keep_in_memory=report.get("kind") != "sft"), report
    except Exception:  # an unreadable entry is a miss, not a failure; it is rewritten below
        return None


def save(root: Path, key: str, dataset: Any, report: dict[str, Any]) -> Path:
    """Store an entry atomically; returns its folder. A concurrent writer of the same key wins, ours is dropped."""
    entry = root / key
    tmp = root / f".{key}.{os.getpid()}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a "Saving the dataset" bar per split is noise; our report says where it went
    try:
        dataset.save_to_disk(str(tmp))
    finally:
        if not quiet:
            enable_progress_bars()
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    if entry.exists():  # a broken entry (load failed) or one written meanwhile by another run
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


_CHECKS_VERSION = 2  # bump when check_data_files checks more: files that passed an older version are read again


def checked_marker(data: Any, src: Any, kind: str, key: str, specials: Any = None) -> Path | None:
    """Where the record that this source passed preflight's `check_data_files` lives: in the data cache, named by the
    file's content hash, the source settings, the stage kind, the special-token strings looked for (and what to do
    with them) and the checks' version; None without a cache. A warm start on a large corpus then hashes the file
    (fast) instead of parsing every row in Python again."""
    if not data.cache_dir:
        return None
    parts = [_CHECKS_VERSION, kind, fingerprint(src, key), src.model_dump(mode="json"),
             data.special_tokens_in_content, specials]
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()
    return Path(data.cache_dir) / "checked" / digest


def mark_checked(marker: Path) -> None:
    """Record a passed check (an empty file: its name is the record); a cache folder that cannot be written only
    means the next start checks again."""
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
