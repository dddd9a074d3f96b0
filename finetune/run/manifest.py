"""Lineage: `manifest.json` in every run folder says exactly what produced the run.

It holds the resolved recipe and its hash, every data file with its content hash, the base model (path or Hub id,
revision, resolved commit, a fingerprint of its files), package versions, the git commit of the code, the seeds and
the hardware. Nothing secret goes in: no environment variables, and the recipe passes through `tracking.redact`.
Exports and model cards copy it (`read_manifest`, `lineage_lines`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.distributed.process import is_main_process
from finetune.hashing import file_sha256
from finetune.recipe.schema import Recipe
from finetune.run.files import read_json, write_json_atomic
from finetune.run.folder import written_entries
from finetune.run.records import redact

MANIFEST = "manifest.json"
PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
            "safetensors", "tokenizers", "huggingface_hub", "triton")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the resolved recipe without its `output` section (where a run goes does not change what it trains)."""
    data = recipe.model_dump(mode="json", exclude={"output"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _path_record(path: Path) -> dict[str, Any]:
    """Content hash and size of a file, or of every file in a folder (one combined hash)."""
    if path.is_file():
        return {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return {"sha256": h.hexdigest(), "bytes": sum(p.stat().st_size for p in files), "files": len(files)}


def data_records(recipe: Recipe) -> list[dict[str, Any]]:
    """Every dataset the recipe reads (train, eval, task_eval of each stage), once each, with content hashes."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, stage in enumerate(recipe.effective_stages()):
        data = recipe.stage_data(stage)
        prefix = f"stages[{i}].data" if stage.data is not None else "data"
        entries = [(f"{prefix}.{group}[{j}]", src.path, src.revision)
                   for group in ("train", "eval") for j, src in enumerate(getattr(data, group))]
        if data.task_eval:
            entries.append((f"{prefix}.task_eval", data.task_eval, None))
        for key, source, revision in entries:
            if source in seen:
                continue
            seen.add(source)
            path = Path(source)
            record: dict[str, Any] = {"key": key, "path": source}
            if path.exists():
                record["resolved"] = str(path.resolve())
                record.update(_path_record(path))
            else:  # a Hub dataset id
                record.update({"hub_id": source, "revision": revision})
            out.append(record)
    return out


def model_record(recipe: Recipe) -> dict[str, Any]:
    """The base model: where it came from and a fingerprint of its files (hashing multi-GB weights is left out;
    their names and sizes are recorded)."""
    cfg = recipe.model
    record: dict[str, Any] = {"name_or_path": cfg.name_or_path, "revision": cfg.revision}
    gguf = _gguf_record(cfg)
    if gguf is not None:
        return {**record, **gguf}
    folder = Path(cfg.name_or_path)
    if not folder.exists():
        from finetune.recipe.checks import looks_like_hub_id

        if looks_like_hub_id(cfg.name_or_path):
            record["hub_commit"] = _hub_commit(cfg.name_or_path, cfg.revision)
            folder = _hub_snapshot(cfg.name_or_path, cfg.revision) or folder
    if folder.is_dir():
        record["resolved"] = str(folder.resolve())
        record["files_sha256"] = {n: file_sha256(folder / n) for n in MODEL_FILES if (folder / n).is_file()}
        record["weights"] = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    return record


def _gguf_record(cfg: Any) -> dict[str, Any] | None:
    """A GGUF base: its file hash (a changed file is a changed base on resume), quant type and architecture."""
    from finetune.recipe.gguf_source import gguf_path, read_header

    path = gguf_path(cfg)
    if path is None or not path.is_file():
        return None
    sha = file_sha256(path, Path(cfg.gguf_cache) / "index.json")
    header = read_header(path)
    return {"resolved": str(path.resolve()), "files_sha256": {path.name: sha},
            "weights": {path.name: path.stat().st_size},
            "gguf": {"quant_type": header.quant_type, "architecture": header.architecture, "name": header.name,
                     "dequantized": True, "note": "dequantized by transformers' GGUF reader, cached as safetensors "
                     f"under {cfg.gguf_cache}/{sha[:20]}"}}


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    snapshot = _hub_snapshot(repo_id, revision)
    return snapshot.name if snapshot is not None else None  # cache snapshots are named by commit


def _git(folder: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding `folder`, or None."""
    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"root": run("rev-parse", "--show-toplevel"), "commit": run("rev-parse", "HEAD"),
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def code_record() -> dict[str, Any]:
    """The finetune code (and the working directory's project, when it is another git checkout)."""
    record: dict[str, Any] = {"finetune": _git(Path(__file__).resolve().parent)}
    here = _git(Path.cwd())
    if here is not None and (record["finetune"] is None or here["root"] != record["finetune"]["root"]):
        record["workdir"] = here
    return record


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import os

    import torch

    record: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                              "cpu_count": os.cpu_count(), "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            record["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                   "capability": f"{props.major}.{props.minor}"})
    return record


def build_manifest(recipe: Recipe, recipe_path: str | Path | None = None) -> dict[str, Any]:
    """Everything a person needs to know what produced a run, as a JSON-ready dict."""
    seeds = {s.name: recipe.stage_training(s).seed for s in recipe.effective_stages()}
    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"source": str(recipe_path or ""), "sha256": recipe_hash(recipe),
                   "resolved": redact(recipe.model_dump(mode="json"))},
        "seeds": seeds,
        "base_model": model_record(recipe),
        "data": data_records(recipe),
        "packages": package_versions(),
        "code": code_record(),
        "hardware": hardware(),
        "command": [Path(sys.argv[0]).name, *redact(sys.argv[1:])],
        "written": written_entries([s.name for s in recipe.effective_stages()]),  # what --overwrite may delete
        "adapter_files": adapter_files(recipe),
    }


def adapter_files(recipe: Recipe) -> list[str]:
    """The files of each stage's `adapter/` folder: peft's, and finetune's own expert adapters on a MoE base
    (`lora.experts: shared`, `per_expert` on 4-bit experts: not loadable by peft alone)."""
    from finetune.model.families import model_type, traits

    files = ["adapter_config.json", "adapter_model.safetensors"]
    if recipe.own_expert_adapters() and traits(model_type(recipe.model)).fused_experts:
        files.append("expert_adapter.safetensors")  # finetune.model.expert_adapters.EXPERT_FILE
    return files


def write_recipe(recipe: Recipe, run_dir: Path) -> Path:
    """Write `<run>/recipe.yaml`, the resolved recipe, redacted by the rule of manifest.json (`records.redact`)."""
    from finetune.recipe.loading import dump_recipe
    from finetune.run.files import write_text_atomic

    path = Path(run_dir) / "recipe.yaml"
    write_text_atomic(path, dump_recipe(recipe, clean=redact))
    return path


def write_manifest(recipe: Recipe, run_dir: Path, recipe_path: str | Path | None = None,
                   manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `<run>/manifest.json` (main process only); `manifest`: one already built for this run.

    A run written again (resumed, or rerun from a stage) keeps its creation time, lists its resumes, and keeps each
    earlier manifest under `history`, so the hashes the run started with are never lost.
    """
    manifest = manifest or build_manifest(recipe, recipe_path)
    if not is_main_process():
        return manifest
    old = read_json(Path(run_dir) / MANIFEST, None)
    if old:
        manifest["history"] = [*old.get("history", []), {k: v for k, v in old.items() if k != "history"}]
        if old.get("recipe", {}).get("sha256") == manifest["recipe"]["sha256"]:
            manifest["resumed"] = [*old.get("resumed", []), manifest["created"]]
            manifest["created"] = old.get("created", manifest["created"])
    write_json_atomic(Path(run_dir) / MANIFEST, manifest)
    return manifest


def input_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """How the data files and the base model of `new` differ from those a run's manifest `old` recorded."""
    if not old:
        return []
    out = []
    before = {d.get("key") or d.get("path"): d for d in old.get("data", [])}
    for d in new.get("data", []):
        was = before.get(d.get("key") or d.get("path"))
        if was is None or "sha256" not in was:
            continue
        if d.get("sha256") != was["sha256"]:
            now = f"{d.get('bytes', 0):,} bytes, sha256 {str(d.get('sha256'))[:12]}" if "sha256" in d else "missing"
            out.append(f"data {d['path']} ({d.get('key')}) changed: it was {was.get('bytes', 0):,} bytes, sha256 "
                       f"{was['sha256'][:12]}; now {now}")
    model_was, model_now = old.get("base_model", {}), new.get("base_model", {})
    for key in ("name_or_path", "revision", "hub_commit", "files_sha256", "weights"):
        if key in model_was and model_was.get(key) != model_now.get(key):
            out.append(f"base model {model_now.get('name_or_path')}: its {key.replace('_', ' ')} changed")
    return out


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest of a run folder, or None for runs made before manifests existed."""
    return read_json(Path(run_dir) / MANIFEST, None)


def lineage_lines(manifest: dict[str, Any]) -> list[str]:
    """A short Markdown list of the lineage, for model cards."""
    model = manifest.get("base_model", {})
    code = (manifest.get("code") or {}).get("finetune") or {}
    packages = manifest.get("packages", {})
    pinned = model.get("hub_commit") or model.get("revision")
    lines = [
        f"- recipe sha256: `{manifest['recipe']['sha256'][:16]}`",
        f"- base model: `{model.get('name_or_path')}`" + (f" @ `{pinned}`" if pinned else ""),
    ]
    if gguf := model.get("gguf"):
        sha = next(iter((model.get("files_sha256") or {}).values()), "")
        lines.append(f"- base model from a GGUF file: {gguf.get('quant_type')} ({gguf.get('architecture')}), sha256 "
                     f"`{sha[:16]}`, dequantized for training (the LoRA update was learned on the dequantized weights)")
    for d in manifest.get("data", []):
        if "sha256" in d:
            lines.append(f"- data `{d['path']}`: sha256 `{d['sha256'][:16]}`")
        else:
            lines.append(f"- data `{d['path']}` (Hub, revision {d.get('revision') or 'default'})")
    lines.append(f"- seeds: {', '.join(f'{k}={v}' for k, v in manifest.get('seeds', {}).items())}")
    if code.get("commit"):
        dirty = " (uncommitted changes)" if code.get("dirty") else ""
        lines.append(f"- finetune commit `{code['commit'][:12]}`{dirty}")
    main = ("python", "torch", "transformers", "peft", "trl")
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in packages.items() if v and k in main))
    return lines
