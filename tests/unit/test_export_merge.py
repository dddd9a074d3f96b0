"""The merge walks the trained model key by key; on an unquantized base it must equal peft's own merge_and_unload."""

from __future__ import annotations

import torch

from finetune.recipe import Recipe


def test_fp32_merge_matches_peft_merge_and_unload(tiny_model, tmp_path):
    from finetune.adapters import attach
    from finetune.merge import build_reference, merged_state_dict, plain_config, plain_keys
    from finetune.model import load_model, load_tokenizer

    recipe = Recipe(
        model={"name_or_path": str(tiny_model), "dtype": "float32"},
        lora={"r": 4, "alpha": 8, "use_rslora": True, "modules_to_save": ["lm_head"]},
        data={"train": [{"path": "unused.jsonl"}]},
    )
    tokenizer = load_tokenizer(recipe.model)
    model = attach(load_model(recipe, tokenizer=tokenizer), recipe.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # B = 0 at init would make the merge a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(tmp_path / "adapter"))

    reference = build_reference(recipe, tmp_path / "adapter", tokenizer)
    ours = merged_state_dict(recipe, tmp_path / "adapter", reference, tokenizer, "dequantized")
    peft = merged_state_dict(recipe, tmp_path / "adapter", reference, tokenizer, "original")
    assert list(ours) == plain_keys(plain_config(reference)) == list(peft)
    for key in ours:
        torch.testing.assert_close(ours[key], peft[key], rtol=0, atol=1e-6, msg=key)
    base = load_model(recipe, tokenizer=tokenizer).state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[q_proj] - base[q_proj]).abs().max() > 1e-3
    assert (ours["lm_head.weight"] - base["lm_head.weight"]).abs().max() > 1e-2  # the trained copy, not the base


def test_reference_runs_the_adapter_in_its_saved_dtype(tiny_model, tmp_path):
    """trl trains QLoRA adapters in bfloat16; peft would load them as float32, which is not the trained model."""
    from safetensors.torch import load_file, save_file

    from finetune.adapters import attach
    from finetune.merge import build_reference
    from finetune.model import load_model, load_tokenizer

    recipe = Recipe(model={"name_or_path": str(tiny_model), "dtype": "float32"}, lora={"r": 4},
                    data={"train": [{"path": "unused.jsonl"}]})
    tokenizer = load_tokenizer(recipe.model)
    attach(load_model(recipe, tokenizer=tokenizer), recipe.lora).save_pretrained(str(tmp_path / "a"))
    file = tmp_path / "a" / "adapter_model.safetensors"
    assert {p.dtype for n, p in build_reference(recipe, tmp_path / "a", tokenizer).named_parameters()
            if "lora_" in n} == {torch.float32}
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    assert {p.dtype for n, p in build_reference(recipe, tmp_path / "a", tokenizer).named_parameters()
            if "lora_" in n} == {torch.bfloat16}
