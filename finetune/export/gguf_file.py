"""Write merged weights, the tokenizer and metadata into one GGUF file (the `gguf` package writes the format).

f32, f16, bf16 and q8_0 are written here, tensor by tensor (`gguf.quants`); q4_k_m is llama.cpp's own mix of
4- and 6-bit K-quants, so that file is made by llama.cpp's quantizer (`llama_model_quantize`, through
llama-cpp-python) from an f16 file. One-dimensional tensors (norms, biases, rope factors) stay float32, as llama.cpp
expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.export.gguf_arch import arch_of, extra_tensors, split_experts, to_gguf_layout, write_hparams
from finetune.export.gguf_vocab import Vocab, write_vocab

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


def check_quant(quant: str) -> None:
    """Refuse a quantisation name we do not write."""
    if quant not in QUANTS:
        raise FinetuneError(f"--quant {quant}: unknown quantisation; choose one of {', '.join(QUANTS)}")


def _types(quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_k_m": (Q.F16, F.MOSTLY_Q4_K_M)}[quant]


def _encode(array: Any, qtype: Any) -> tuple[Any, Any]:
    """A float32 tensor as stored in the file: 1-D ones as float32, others quantized (q8_0 needs rows of 32
    values; a row that is not falls back to f16)."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == Q.F32:
        return array.astype(np.float32), Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        qtype = Q.F16
    return gguf.quants.quantize(array, qtype), qtype


def _add(writer: Any, name: str, array: Any, qtype: Any, counts: dict[str, int]) -> None:
    import numpy as np

    data, used = _encode(np.ascontiguousarray(array), qtype)
    writer.add_tensor(name, data, raw_dtype=used)
    counts[used.name] = counts.get(used.name, 0) + 1


def write_gguf(path: Path, state: dict[str, Any], config: Any, vocab: Vocab, quant: str,
               metadata: dict[str, str]) -> dict[str, int]:
    """Write `state` (plain transformers names, float tensors) as a GGUF file of `quant`.

    Args:
        path: the .gguf file to write.
        state: merged weights under the names of a plain transformers model (a tied output layer appears once).
        config: the model's transformers config.
        vocab: the tokenizer (`gguf_vocab.build_vocab`).
        quant: one of `QUANTS`.
        metadata: general.* strings (name, description, ...).

    Returns:
        How many tensors were written in each GGML type, e.g. {"F32": 9, "Q8_0": 14}.
    """
    import gguf

    check_quant(quant)
    arch = arch_of(config, "model config")
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    qtype, file_type = _types(quant)
    if quant == "q4_k_m":  # llama.cpp quantizes this one from an f16 file
        qtype, file_type = _types("f16")
    writer = gguf.GGUFWriter(str(path), arch.gguf)
    counts: dict[str, int] = {}
    try:
        writer.add_name(metadata.get("name", "model"))
        for key, value in metadata.items():
            if key != "name":
                writer.add_string(f"general.{key}", value)
        write_hparams(writer, config)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        for key, tensor in state.items():
            for part, array in split_experts(key, to_gguf_layout(key, tensor.float().numpy(), config, arch)):
                name = names.get_name(part, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise FinetuneError(f"GGUF export: the weight '{key}' has no llama.cpp name for architecture "
                                        f"'{arch.gguf}'; this model variant is not supported")
                _add(writer, name, array, qtype, counts)
        for name, array in extra_tensors(config).items():
            _add(writer, name, array, qtype, counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts


def quantize_with_llama_cpp(source: Path, dest: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer: `source` (an f16 GGUF file) -> `dest` in `quant` (q4_k_m)."""
    import llama_cpp

    ftypes = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if code != 0 or not dest.exists():
        raise FinetuneError(f"llama.cpp could not quantize {source.name} to {quant} (return code {code})")
