"""Hub ids: what looks like one, whether the Hub can be reached, and whether a copy is in the local cache.

The recipe-wide path checks that use these live in `finetune.stages.preflight`."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(value: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(HUB_ID.match(value)) and not Path(value).exists() and not value.startswith((".", "/"))


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be reached right now, or None when it can (a 3-second TCP probe, no request sent)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as e:
        return f"cannot connect to {host} ({e.__class__.__name__})"


def hub_cached(repo_id: str, revision: str | None, repo_type: str = "model") -> bool:
    """True when a usable copy of the repo is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    filename = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    return isinstance(found, str)


def check_hub(repo_id: str, revision: str | None, key: str, repo_type: str) -> list[str]:
    reason = hub_offline_reason()
    if reason is None or hub_cached(repo_id, revision, repo_type):
        return []
    what = "model" if repo_type == "model" else "dataset"
    return [
        f"{key}: '{repo_id}' is not a local path (looked in {Path.cwd()}); read as a Hugging Face Hub {what} id, "
        f"the Hub cannot be reached ({reason}) and no copy is in the local cache. Download it where you have "
        f"access (`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''} --local-dir DIR`), "
        f"copy DIR here, and set {key} to that folder."
    ]
