"""The merge walks the trained model key by key; on an unquantized base it must equal peft's own merge_and_unload."""

from __future__ import annotations

import pytest
import torch

from finetune.recipe.schema import Recipe


def tied_copy(tiny_model, out):
    """The tiny model with its output layer tied to the input embeddings (as in Qwen2.5-0.5B, Llama-3.2-1B)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_model, out)
    config = AutoConfig.from_pretrained(str(tiny_model))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_merge_matches_peft_merge_and_unload(tiny_model, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from finetune.export.merge import build_reference, merged_state_dict, plain_config, plain_keys, save_plain_model
    from finetune.export.verify import compare_logits
    from finetune.model.adapters import attach
    from finetune.model.loading import load_model, load_tokenizer

    base_dir = tied_copy(tiny_model, tmp_path / "tied") if tied else tiny_model
    recipe = Recipe(
        model={"name_or_path": str(base_dir), "dtype": "float32"},
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
    keys, tied_keys = plain_keys(plain_config(reference))
    assert tied_keys == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert list(ours) == list(peft) and set(ours) == set(keys) | {"lm_head.weight"}  # trained lm_head kept
    for key in ours:
        torch.testing.assert_close(ours[key], peft[key], rtol=0, atol=1e-6, msg=key)
    base = load_model(recipe, tokenizer=tokenizer).state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[q_proj] - base[q_proj]).abs().max() > 1e-3
    assert (ours["lm_head.weight"] - base["lm_head.weight"]).abs().max() > 1e-2  # the trained copy, not the base

    # Saved and loaded back with plain transformers (a tied base is untied in the config), it is the trained model.
    save_plain_model(ours, reference, tmp_path / "merged", torch.float32, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.tie_word_embeddings is False
    figures = compare_logits(reference, merged, [tokenizer("add 1 2 and 3 4")["input_ids"]])
    assert figures.max_abs_logit_diff < 1e-5 and figures.top1_agreement == 1.0


def test_reference_runs_the_adapter_in_its_saved_dtype(tiny_model, tmp_path):
    """trl trains QLoRA adapters in bfloat16; peft would load them as float32, which is not the trained model."""
    from safetensors.torch import load_file, save_file

    from finetune.export.merge import build_reference
    from finetune.model.adapters import attach
    from finetune.model.loading import load_model, load_tokenizer

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
