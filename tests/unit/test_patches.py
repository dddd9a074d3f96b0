"""finetune.model.patches: every change to a loaded model in one stated order, recorded, once, nothing undone; and
the warning for `lora` keys a saved adapter overrides."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.model import loss_heads
from finetune.model.adapters import attach
from finetune.model.attention import NAME
from finetune.model.patches import applied, apply_patches, record, undone
from finetune.recipe.schema import Recipe

KERNELS = {"rmsnorm": True, "fused_ce": True, "lora_linear": True}


def _recipe(tiny_model, kernels=None) -> Recipe:
    return Recipe.model_validate({"model": {"name_or_path": str(tiny_model), "dtype": "float32"},
                                  "lora": {"r": 4, "alpha": 8}, "data": {"train": [{"path": "unused.jsonl"}]},
                                  "kernels": kernels or {}})


def _sft_trainer(tiny_model, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from finetune.model.adapters import to_peft

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    base.requires_grad_(False)
    model = get_peft_model(base, to_peft(_recipe(tiny_model).lora))
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None, padding_free=True)
    return loss_heads.trainer_class()(model=model, args=config, processing_class=tok,
                                      train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]))


def test_sft_patches_in_order_recorded_once(tiny_model, tmp_path):
    trainer = _sft_trainer(tiny_model, tmp_path)
    lm = trainer.model.get_base_model()
    trl_forward = lm.forward  # trl's fused LM head, added by the trainer's constructor
    lines = apply_patches(trainer.model, _recipe(tiny_model, KERNELS), "sft", "sft", padding_free=True)
    kinds = [line.split(":", 1)[0] for line in lines]
    assert kinds == ["kernel"] * 2 + ["lean saves", "tiled mlp", "attention", "loss head"], lines
    assert lines == applied(trainer.model)
    assert "fused_ce" in lines[-1] and not any("fused_ce" in line for line in lines[:-1])
    # the stack, outermost first: our loss head (the one owner of the forward, fused_ce included) -> trl's fused head
    assert loss_heads.head_of(trainer.model) == loss_heads.FLAG
    assert not hasattr(lm, "_finetune_orig_forward")
    assert lm.forward.__func__.__closure__ is not None
    assert trl_forward in [c.cell_contents for c in lm.forward.__func__.__closure__]
    assert lm.config._attn_implementation == NAME
    assert undone(trainer.model) == []
    with pytest.raises(FinetuneError, match="already patched"):
        apply_patches(trainer.model, _recipe(tiny_model, KERNELS), "sft", "sft", padding_free=True)
    assert applied(trainer.model) == lines  # the refused call changed nothing
    with pytest.raises(FinetuneError, match="must come before 'lean saves"):
        record(trainer.model, "kernel", "late")


def test_undone_patches_are_named(tiny_model, tmp_path):
    trainer = _sft_trainer(tiny_model, tmp_path)
    apply_patches(trainer.model, _recipe(tiny_model, KERNELS), "sft", "sft", padding_free=True)
    lm = trainer.model.get_base_model()
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(lm)  # e.g. a second trainer built on the patched model: its head now hides ours
    lm.config._attn_implementation = "sdpa"
    problems = undone(trainer.model)
    assert any("no longer the loss head" in p for p in problems) and any("attention is 'sdpa'" in p for p in problems)


def test_sft_without_a_label_head_keeps_trls_loss(tiny_model, tmp_path):
    """A model the label-positions loss cannot serve: recorded as trl's loss, and the trainer computes trl's."""
    trainer = _sft_trainer(tiny_model, tmp_path)
    trainer.model.get_base_model().config.final_logit_softcapping = 30.0
    lines = apply_patches(trainer.model, _recipe(tiny_model), "sft", "sft", padding_free=False)
    assert lines[0].startswith("lean saves: ") and lines[1].startswith("tiled mlp: ")
    assert lines[2:] == ["loss head: none, trl's own loss and fused LM head (the model transforms its logits "
                         "(final_logit_softcapping=30.0))"]
    assert loss_heads.head_of(trainer.model) is None
    batch = trainer.data_collator([{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 8, 9]}])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.isfinite(loss)
    assert trainer._metrics["train"]["entropy"]  # trl's compute_loss ran (it logs entropy; the label head does not)


def test_dpo_compact_head_with_padding_free_rows(tiny_model, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from finetune.model.adapters import to_peft

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    base.requires_grad_(False)
    rows = [{"prompt": [{"role": "user", "content": "add 1 2"}], "chosen": [{"role": "assistant", "content": "3"}],
             "rejected": [{"role": "assistant", "content": "4"}]}]
    trainer = DPOTrainer(model=get_peft_model(base, to_peft(_recipe(tiny_model).lora)),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    lines = apply_patches(trainer.model, _recipe(tiny_model), "dpo", "dpo", padding_free=True)
    assert [line.split(":", 1)[0] for line in lines] == ["lean saves", "tiled mlp", "attention", "loss head"]
    assert "padding-free rows" in lines[-1] and loss_heads.head_of(trainer.model) == "compact_fused_head"


def test_ignored_lora_keys_are_named_once(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    recipe = _recipe(tiny_model)
    attach(base(), recipe.lora).save_pretrained(tmp_path / "a")  # all-linear, r 4, alpha 8
    attach(base(), recipe.lora, tmp_path / "a", stage="dpo")
    assert "warning" not in capsys.readouterr().out  # same settings (all-linear resolved as peft does): no warning
    other = recipe.lora.model_copy(update={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    attach(base(), other, tmp_path / "a", stage="dpo")
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("[dpo] warning:"), lines
    assert "lora.r: 16 -> 4" in lines[0] and "lora.target_modules: ['q_proj', 'v_proj'] -> [" in lines[0]
    assert "lora.alpha" not in lines[0]
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 4  # the adapter trained on is the saved one
