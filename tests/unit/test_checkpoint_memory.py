"""A quantized model on the CPU keeps no weight inside the memory-mapped checkpoint (`loading.own_memory`): such a
view kept every page of the file resident for the whole run (0.6 GB of the MoE benchmark's 0.65 GB checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from build_fixture_models import build

from finetune.model.loading import load_model
from finetune.recipe.schema import Recipe

MAPS = Path("/proc/self/maps")


def _mapped_checkpoints() -> list[tuple[int, int]]:
    """Address ranges of the .safetensors files this process has mapped."""
    ranges = []
    for line in MAPS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not MAPS.exists(), reason="reads the process's memory maps (Linux)")
@pytest.mark.parametrize("family,quantization", [
    ("qwen3-moe", {"mode": "nf4", "compute_dtype": "float32", "experts": True}),
    ("llama3", {"mode": "nf4", "compute_dtype": "float32"}),
])
def test_quantized_model_holds_no_view_of_the_checkpoint(tmp_path, family, quantization):
    folder = build(family, tmp_path / family)
    model = load_model(Recipe(model={"name_or_path": str(folder), "dtype": "float32"}, quantization=quantization,
                              data={"train": [{"path": "x"}]}))
    ranges = _mapped_checkpoints()
    inside = [name for name, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in ranges)]
    assert inside == [], inside
    assert type(model.get_input_embeddings().weight) is torch.nn.Parameter
    tied = build("qwen2.5", tmp_path / "tied")  # ties its LM head to the embeddings: still one weight
    model = load_model(Recipe(model={"name_or_path": str(tied), "dtype": "float32"}, quantization=quantization,
                              data={"train": [{"path": "x"}]}))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
