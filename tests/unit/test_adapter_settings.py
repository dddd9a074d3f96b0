"""The warning a stage gives when it starts from a saved adapter names only the `lora` keys that really differ:
`all-linear` resolved by peft to full module paths (tied-embedding models) is the same as the saved module names."""

from __future__ import annotations

from pathlib import Path

from finetune.model.adapters import ignored_lora_keys
from finetune.recipe.schema import LoraConfig

ROOT = Path(__file__).resolve().parents[2]


def test_all_linear_matches_the_saved_module_names(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(ROOT / "models" / "tiny-chat"))
    assert base.config.tie_word_embeddings  # where peft resolves all-linear to full paths
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(base, PeftLoraConfig(r=16, lora_alpha=32, target_modules=names)).save_pretrained(str(tmp_path))
    fresh = AutoModelForCausalLM.from_pretrained(str(ROOT / "models" / "tiny-chat"))
    assert ignored_lora_keys(fresh, LoraConfig(r=16, alpha=32, target_modules="all-linear"), tmp_path) == []
    differ = ignored_lora_keys(fresh, LoraConfig(r=8, alpha=32, target_modules=["q_proj", "v_proj"]), tmp_path)
    assert [line.split(":")[0] for line in differ] == ["lora.r", "lora.target_modules"]
