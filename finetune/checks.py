"""Checks that need the file system or the network but no model: run by `ft validate` and before every `ft train`."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from finetune.data.templates import TEMPLATE_NAMES
from finetune.recipe import Recipe

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


def _check_hub(repo_id: str, revision: str | None, key: str, repo_type: str) -> list[str]:
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


def check_recipe_paths(recipe: Recipe) -> list[str]:
    """Every path the recipe names exists (or is a reachable/cached Hub id). Returns problems, empty when fine."""
    problems: list[str] = []
    name = recipe.model.name_or_path
    if not Path(name).exists():
        if looks_like_hub_id(name):
            problems += _check_hub(name, recipe.model.revision, "model.name_or_path", "model")
        else:
            problems.append(
                f"model.name_or_path: '{name}' does not exist (resolved against {Path.cwd()}) and is not a Hub id "
                "(OWNER/NAME). Point it at a model folder with config.json and weights."
            )
    elif Path(name).is_dir() and not (Path(name) / "config.json").exists():
        problems.append(f"model.name_or_path: '{name}' has no config.json; is it a transformers model folder?")

    stages = recipe.effective_stages()
    seen_data: set[int] = set()
    for i, stage in enumerate(stages):
        data = recipe.stage_data(stage)
        prefix = f"stages[{i}].data" if stage.data is not None else "data"
        if id(data) not in seen_data:
            seen_data.add(id(data))
            for group in ("train", "eval"):
                for j, src in enumerate(getattr(data, group)):
                    key = f"{prefix}.{group}[{j}].path"
                    if Path(src.path).exists():
                        continue
                    if looks_like_hub_id(src.path):
                        problems += _check_hub(src.path, src.revision, key, "dataset")
                    else:
                        problems.append(f"{key}: '{src.path}' does not exist (resolved against {Path.cwd()})")
            if data.template not in TEMPLATE_NAMES and not Path(data.template).exists():
                problems.append(
                    f"{prefix}.template: '{data.template}' is neither a template name "
                    f"({', '.join(sorted(TEMPLATE_NAMES))}) nor an existing Jinja file"
                )
            if data.task_eval and not Path(data.task_eval).exists():
                problems.append(f"{prefix}.task_eval: '{data.task_eval}' does not exist")
        for key, value in ((f"stages[{i}].init_from", stage.init_from), (f"stages[{i}].dpo.reference", None)):
            if value not in (None, "previous", "new") and not Path(value).exists():
                problems.append(f"{key}: adapter folder '{value}' does not exist")
        if stage.kind == "dpo" and stage.dpo.reference not in ("sft", "base"):
            ref = Path(stage.dpo.reference)
            if not (ref / "adapter_config.json").exists():
                problems.append(
                    f"stages[{i}].dpo.reference: '{stage.dpo.reference}' is not 'sft', 'base' or an adapter folder "
                    "with adapter_config.json"
                )
    from finetune.kernel_support import recipe_kernel_problems
    from finetune.launch import environment_problems  # deepspeed installed, launch config, batch split

    problems += recipe_kernel_problems(recipe)

    problems += environment_problems(recipe)
    return problems
