"""The run folder's record files, readable without torch: metrics.jsonl rows, and redaction of secrets.

`redact` is applied to every string that leaves the process about a run (the W&B config, run name, tags and entity;
manifest.json with its command line; the exported model card): a key named like *token*, *secret*, *password*,
*api_key* or *credential*, or a value shaped like a Hugging Face, OpenAI or W&B key (`wandb_v1_...` or 40 hex
digits), becomes `<redacted>`. 40 hex digits are also a git commit: they are kept under a key naming a revision or
commit (`model.revision`, `code.commit`) and after `revision=` / `commit=` in a command line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from finetune.run.files import write_text_atomic

# Keys that hold credentials: `token`, `hf_token`, `hub_token`, `api_key`, `password`... but not counters or
# tokenizer fields such as `tokens_per_second`, `pad_token` or `max_new_tokens`.
SECRET_KEY = re.compile(
    r"^(?:(?:hf|hub|access|auth|api|wandb|bearer|github)_)?token$|secret|passw|api_?key|credential", re.IGNORECASE
)
# A Hugging Face token wherever it stands (inside a longer word or URL too); OpenAI and W&B keys as whole words.
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|\b(?:sk-[A-Za-z0-9_-]{20,}|wandb_v1_[A-Za-z0-9_]{20,})\b")
HEX_KEY = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{40}(?![0-9A-Za-z])")  # classic W&B API key; or a git commit
COMMIT_KEY = re.compile(r"revision|commit", re.IGNORECASE)
_COMMIT_BEFORE = re.compile(r"(?:revision|commit)\w*\s*[=:]\s*['\"]?$", re.IGNORECASE)


def redact_text(text: str, commit: bool = False) -> str:
    """`text` with token-shaped substrings replaced by `<redacted>`; `commit`: 40-hex values are commits here."""
    text = SECRET_VALUE.sub("<redacted>", text)
    if commit:
        return text
    return HEX_KEY.sub(lambda m: m.group(0) if _COMMIT_BEFORE.search(text[: m.start()]) else "<redacted>", text)


def redact(value: Any, commit: bool = False) -> Any:
    """A copy of a JSON-like value with credential-looking keys and values replaced by `<redacted>`.

    Args:
        value: a dict, list, string or scalar (nested freely).
        commit: the value sits under a key naming a revision or commit, so 40 hex digits are kept.

    Returns:
        The redacted copy.
    """
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v else redact(v, bool(COMMIT_KEY.search(str(k))))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, commit) for v in value]
    if isinstance(value, str):
        return redact_text(value, commit)
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file (an unfinished last line is skipped)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stage_eval_at_start(path: Path, stage: str) -> dict[str, float] | None:
    """The held-out evaluation a stage logged before its first step (step 0), as `{metric: value}` without the
    `eval_` prefix, or None."""
    for row in read_metrics(path):
        if row.get("stage") == stage and row.get("step") == 0 and "eval_loss" in row:
            return {k[len("eval_"):]: v for k, v in row.items() if k.startswith("eval_")}
    return None


def trim_metrics(path: Path, stage: str, after_step: int, ends: bool = False) -> int:
    """Drop the rows of `stage` logged after `after_step` (work a crash threw away), and with `ends` its
    end-of-training rows (`train_runtime`...: an interrupted attempt's; the resumed one writes its own). Returns how
    many rows were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half-written last line of a killed run
        if row.get("stage") == stage and (row.get("step", 0) > after_step or (ends and "train_runtime" in row)):
            continue
        kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)
