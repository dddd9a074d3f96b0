"""A base model held as a GGUF file (from Ollama, LM Studio, llama.cpp): where the file is, what its header says,
and whether transformers can read its architecture. Reads the header only (the `gguf` package memory-maps the file);
no torch, no transformers model. Turning the file into a model folder is `finetune.model.gguf_base`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def gguf_path(model: Any) -> Path | None:
    """The GGUF file the recipe's `model` names: `name_or_path` ending in `.gguf`, or a folder plus `gguf_file`.
    None when the base is not a GGUF file (a model folder or a Hub id)."""
    name = Path(model.name_or_path)
    if getattr(model, "gguf_file", None):
        return name / model.gguf_file
    if name.suffix.lower() == ".gguf":
        return name
    return None


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF header says about the model inside."""

    architecture: str  # llama.cpp's name: llama, qwen2, qwen3moe, gemma2, ...
    name: str | None  # general.name
    quant_type: str  # the file type: Q4_1, Q8_0, F16, ... (the dominant tensor type when the field is absent)
    tensor_types: dict[str, int]  # ggml type name -> number of tensors of that type
    has_chat_template: bool

    def describe(self) -> str:
        return f"GGUF {self.quant_type} ({self.architecture}{', ' + self.name if self.name else ''})"


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if len(field.types) and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_header(path: Path) -> GgufHeader:
    """The architecture, quant type and tensor types of a GGUF file (raises ValueError when it is not GGUF); read
    once per process and file version (the reader walks every tensor's entry: seconds for a large file)."""
    stat = Path(path).stat()
    return _read_header(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_header(path: str, size: int, mtime_ns: int) -> GgufHeader:
    from gguf import GGUFReader, LlamaFileType

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (its first bytes are not 'GGUF')")
    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    file_type = _field(reader, "general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = None
    if quant is None:  # the most common type among the 2-D tensors stands for the file
        quant = max(types, key=types.get) if types else "unknown"
    return GgufHeader(architecture=str(_field(reader, "general.architecture")), name=_field(reader, "general.name"),
                      quant_type=quant, tensor_types=types,
                      has_chat_template=reader.fields.get("tokenizer.chat_template") is not None)


def readable_architectures() -> list[str]:
    """The GGUF architectures (llama.cpp's names) the installed transformers can turn into a model."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:  # the newer loader (transformers 5.2x) handles a few architectures of its own
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})  # sections of transformers' key mapping, not architectures


def architecture_readable(architecture: str, readable: list[str]) -> bool:
    """transformers spells a few llama.cpp names its own way (qwen3moe -> qwen3_moe, gpt-oss -> gpt_oss)."""
    spellings = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    return bool(spellings & set(readable))


def gguf_problems(model: Any) -> list[str]:
    """What stops the recipe's GGUF base from loading (empty: fine, or the base is not a GGUF file)."""
    path = gguf_path(model)
    if path is None:
        return []
    key = "model.gguf_file" if getattr(model, "gguf_file", None) else "model.name_or_path"
    if not path.is_file():
        return [f"{key}: the GGUF file '{path}' does not exist (resolved against {Path.cwd()})"]
    try:
        header = read_header(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say so, whatever the reader raised
        return [f"{key}: '{path}' cannot be read as GGUF ({e})"]
    readable = readable_architectures()
    if readable and not architecture_readable(header.architecture, readable):
        return [f"{key}: '{path}' holds a '{header.architecture}' model, which the installed transformers cannot "
                f"read from GGUF (it reads: {', '.join(readable)}). Use the model's safetensors release instead."]
    return []


def gguf_model_type(model: Any) -> str | None:
    """transformers' `model_type` of a GGUF base, from its header (None: not GGUF, unreadable, or not readable)."""
    path = gguf_path(model)
    if path is None or not path.is_file():
        return None
    try:
        arch = read_header(path).architecture
    except Exception:  # noqa: BLE001 - reported by gguf_problems
        return None
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}.get(arch, arch)
