"""The run folder's record files, readable without torch: metrics.jsonl rows, and redaction of secrets.

`redact` is applied to whatever leaves the process as text about a run (the W&B config, manifest.json): a key named
like *token*, *secret*, *password*, *api_key* or *credential*, or a value that looks like a Hugging Face, OpenAI or
W&B key, becomes `<redacted>`.
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
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|wandb_v1_[A-Za-z0-9_]{20,})\b")


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with credential-looking keys and values replaced by `<redacted>`."""
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return SECRET_VALUE.sub("<redacted>", value)
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


def trim_metrics(path: Path, stage: str, after_step: int) -> int:
    """Drop the rows of `stage` logged after `after_step` (work a crash threw away). Returns how many were dropped."""
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
        if row.get("stage") == stage and row.get("step", 0) > after_step:
            continue
        kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)
