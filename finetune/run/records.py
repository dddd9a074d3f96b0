"""The run folder's record files, readable without torch: metrics.jsonl rows, and redaction of secrets.

`redact` is applied to every string that leaves the process about a run (the W&B config, run name, tags and entity;
manifest.json with its command line; the run folder's recipe.yaml; the exported model card), and `redact_text` to
every failure text we print or persist (summary.json's `error`, `ft runs`, `ft report`, the CLI's error line, a
reward function's exception): a key named like *token*, *secret*, *password*, *api_key* or *credential*, or a value
shaped like a Hugging Face, OpenAI, W&B (`wandb_v1_...` or 40 hex digits), GitHub (`ghp_...`, `github_pat_...`),
Slack (`xoxb-...`, `xoxp-...`) or AWS access key (`AKIA...`), a bearer token, or the value of a `...key=`,
`...token=`, `...secret=`, `password=`, `...signature=` or `...credential=` assignment (URL query strings, command
lines), becomes `<redacted>`. 40 hex digits are also a git commit: they are kept under a key naming a revision or
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
# A Hugging Face token wherever it stands (inside a longer word or URL too); OpenAI, W&B, GitHub, Slack and AWS
# access keys and bearer tokens as whole words.
SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}"
    r"|\b(?:sk-[A-Za-z0-9_-]{20,}|wandb_v1_[A-Za-z0-9_]{20,})\b"
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})\b"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|(?<=\bBearer )[A-Za-z0-9._~+/-]{16,}=*"
)
# `api_key=VALUE`, `token=...`, `X-Amz-Signature=...` (query strings, command lines, environment assignments): the
# value goes, the name stays. Values of 6 characters or more without `<`, so `pad_token=<pad>` stays readable.
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:key|token|secret|passw(?:or)?d|signature|sig|credential|auth))=([^\s&#'\"<>;,)]{6,})"
)
HEX_KEY = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{40}(?![0-9A-Za-z])")  # classic W&B API key; or a git commit
COMMIT_KEY = re.compile(r"revision|commit", re.IGNORECASE)
_COMMIT_BEFORE = re.compile(r"(?:revision|commit)\w*\s*[=:]\s*['\"]?$", re.IGNORECASE)


def redact_text(text: str, commit: bool = False) -> str:
    """`text` with token-shaped substrings replaced by `<redacted>`; `commit`: 40-hex values are commits here."""
    text = SECRET_ASSIGNMENT.sub(r"\1=<redacted>", SECRET_VALUE.sub("<redacted>", text))
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
