"""A GGUF file as a base model: dequantized once through transformers' GGUF reader, kept as a safetensors model folder
keyed by the file's sha256, and loaded from there like any local model (4-bit NF4 or not, as the recipe says).

`base_source(model)` is what every loader asks for the folder to load (training, `ft eval`, merged and GGUF exports);
for a folder or Hub id it is `model.name_or_path` itself. The folder's `gguf_source.json` says where it came from
(file, sha256, quant type, architecture); the banner, the manifest and the model card repeat it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.hashing import file_sha256
from finetune.recipe.gguf_source import gguf_path, gguf_problems, read_header

SOURCE_FILE = "gguf_source.json"
# Dequantized values are d * q (+ m): exact in float32. Models past this many parameters are kept in bfloat16 (half the
# disk; the 4-bit NF4 load or a bf16 GPU run rounds them that way anyway).
FLOAT32_UP_TO = 2_000_000_000


def _cache_folder(model: Any, sha: str) -> Path:
    return Path(model.gguf_cache) / sha[:20]


def cached_folder(model: Any) -> Path | None:
    """The dequantized folder of the recipe's GGUF base if it exists already (None: not GGUF, or not made yet)."""
    path = gguf_path(model)
    if path is None or not path.is_file():
        return None
    folder = _cache_folder(model, file_sha256(path, Path(model.gguf_cache) / "index.json"))
    return folder if (folder / SOURCE_FILE).is_file() else None


def source_record(model: Any) -> dict[str, Any] | None:
    """What `gguf_source.json` says of the recipe's GGUF base (None: not a GGUF base or not dequantized yet)."""
    folder = cached_folder(model)
    if folder is None:
        return None
    record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    record["folder"] = str(folder)
    return record


def base_source(model: Any) -> str:
    """The folder or Hub id to load the base from: the dequantized cache folder of a GGUF base (made on first use),
    else `model.name_or_path`."""
    path = gguf_path(model)
    if path is None:
        return model.name_or_path
    return str(materialize(model))


def materialize(model: Any) -> Path:
    """Dequantize the recipe's GGUF file into a safetensors model folder (once per file content) and return it."""
    path = gguf_path(model)
    problems = gguf_problems(model)
    if problems:
        raise FinetuneError("; ".join(problems))
    started = time.perf_counter()
    sha = file_sha256(path, Path(model.gguf_cache) / "index.json")
    folder = _cache_folder(model, sha)
    if (folder / SOURCE_FILE).is_file():
        return folder
    header = read_header(path)
    size_mb = path.stat().st_size / 1e6
    print(f"[model] {path.name}: {header.describe()}, {size_mb:,.0f} MB; dequantizing it once through transformers' "
          f"GGUF reader into {folder} (later runs start from there)", flush=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert(path, staging, header)
        record = {"gguf_file": str(path.resolve()), "file_name": path.name, "sha256": sha,
                  "quant_type": header.quant_type, "architecture": header.architecture, "name": header.name,
                  "tensor_types": header.tensor_types, "dequantized": True,
                  "dtype": json.loads((staging / "config.json").read_text()).get("dtype")}
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # another process finished first: its folder is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[model] dequantized in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def _convert(path: Path, out: Path, header: Any) -> None:
    """transformers reads the GGUF (weights dequantized, tokenizer with its chat template); we save safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    # transformers marks a model read from GGUF as GGUF-quantized (not serializable) even when every weight was
    # dequantized: the same weights go into a plain model of the same config, which saves as safetensors.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = torch.bfloat16 if loaded.num_parameters() > FLOAT32_UP_TO else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded, state
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if not any(out.glob("*.safetensors")):
        raise FinetuneError(f"dequantizing {path} wrote no safetensors weights into {out}")


def describe_base(model: Any) -> str | None:
    """One line for the banner and model card: the base came from a GGUF of quant type X, dequantized."""
    record = source_record(model)
    if record is None:
        return None
    return (f"from GGUF {record['file_name']} ({record['quant_type']}, {record['architecture']}), dequantized to "
            f"{record.get('dtype') or 'float32'} safetensors (sha256 {record['sha256'][:12]}...)")
