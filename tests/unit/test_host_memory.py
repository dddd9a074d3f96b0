"""`training.release_host_memory`: glibc's mmap threshold is fixed for CPU training of long rows (auto), always (on)
or never (off), never on a GPU run, and a C library that is not glibc is left alone with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.recipe.schema import Recipe
from finetune.stages import host_memory


class FakeGlibc:
    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result

    def gnu_get_libc_version(self) -> bytes:
        return b"2.36"


def _recipe(setting: str, max_length: int) -> Recipe:
    return Recipe.model_validate({"model": {"name_or_path": "m"}, "data": {"train": [{"path": "x"}],
                                                                            "max_length": max_length},
                                  "training": {"release_host_memory": setting}})


@pytest.mark.parametrize("setting, length, cuda, threshold", [
    ("auto", 8192, False, 1 << 20), ("auto", 4096, False, 4 << 20), ("on", 128, False, 1 << 20),
    ("off", 32768, False, None), ("on", 32768, True, None), ("auto", 32768, True, None)])
def test_when_the_threshold_is_fixed(setting, length, cuda, threshold):
    libc = FakeGlibc()
    line = host_memory.apply(_recipe(setting, length), cuda=cuda, libc=libc)
    called = threshold is not None
    assert libc.calls == ([(host_memory.M_MMAP_THRESHOLD, threshold)] if called else [])
    assert (line is not None and "returned to the system" in line) is called


def test_other_c_libraries_and_refusals_are_said():
    class Musl:
        def mallopt(self, *a):
            raise AssertionError("not called")

    assert "not glibc" in host_memory.apply(_recipe("on", 128), cuda=False, libc=Musl())
    assert "refused" in host_memory.apply(_recipe("on", 128), cuda=False, libc=FakeGlibc(result=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_this_machines_glibc_takes_it():
    code = ("from finetune.recipe.schema import Recipe; from finetune.stages import host_memory as h; "
            "r = Recipe.model_validate({'model': {'name_or_path': 'm'}, 'data': {'train': [{'path': 'x'}]}, "
            "'training': {'release_host_memory': 'on'}}); print(h.apply(r, cuda=False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "returned to the system" in out, out


def test_bare_yaml_on_and_off_mean_the_words(tmp_path):
    """YAML reads `on`/`off` as booleans; in a recipe file and in a `--set` they mean the settings."""
    import yaml

    from finetune.recipe.schema import load_recipe

    for word in ("on", "off"):
        path = tmp_path / f"{word}.yaml"
        path.write_text(f"data:\n  train:\n    - path: x.jsonl\ntraining:\n  release_host_memory: {word}\n")
        assert yaml.safe_load(path.read_text())["training"]["release_host_memory"] is (word == "on")
        assert load_recipe(path).training.release_host_memory == word
        overridden = load_recipe(tmp_path / "on.yaml", [f"training.release_host_memory={word}"])
        assert overridden.training.release_host_memory == word
