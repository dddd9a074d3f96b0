"""The dtype policy of a bf16 (GPU-style) QLoRA run, checked on the CPU under bf16 autocast with the tiny model.

- trainable adapter weights stay float32 under bf16 (trl casts them to bf16; a bf16 weight absorbs only part of a
  small DPO-rate update), and a stage that starts from a saved adapter starts from its exact values;
- frozen floating weights (embeddings, LM head, norms) stay in the compute dtype instead of being upcast to float32,
  with the same loss as the upcast path within bf16 tolerance.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from finetune.model.adapters import attach, prepare_base
from finetune.model.loading import bnb_config
from finetune.recipe.schema import LoraConfig, QuantizationConfig, Recipe, StageConfig
from finetune.stages.common import StageContext, build_stage_trainer

LR_DPO = 5e-6


def _bf16_4bit(tiny_model):
    quant = bnb_config(QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, quantization_config=quant,
                                                device_map={"": "cpu"})


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 60, (2, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _trainer(tiny_model, tmp_path, init_from=None):
    model = attach(prepare_base(_bf16_4bit(tiny_model), gradient_checkpointing=False), LoraConfig(r=8, alpha=16),
                   init_from)
    recipe = Recipe(model={"name_or_path": str(tiny_model)}, data={"train": [{"path": "unused.jsonl"}]})
    ctx = StageContext(recipe=recipe, stage=StageConfig(name="sft", kind="sft"), run_dir=tmp_path,
                       init_adapter=init_from)
    config = SFTConfig(output_dir=str(tmp_path / "out"), bf16=True, use_cpu=True, report_to=[],
                       learning_rate=LR_DPO, max_length=None)
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[5, 6, 7]]})
    return build_stage_trainer(SFTTrainer, ctx, model, config, AutoTokenizer.from_pretrained(tiny_model), ds, None)


def test_adapters_stay_float32_under_bf16_and_take_small_updates_like_fp32(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path)
    model = trainer.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), \
        {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32}
    # lora_B starts at zero: give it values of a trained adapter's size first, as DPO starts from an SFT adapter
    with torch.no_grad():
        for n, p in trainable.items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    reference = {n: p.detach().double().clone().requires_grad_() for n, p in trainable.items()}

    optimizer = torch.optim.AdamW(list(trainable.values()), lr=LR_DPO, weight_decay=0.0)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**_batch(step)).loss
        loss.backward()
        # the fp32 reference: the same gradients applied by the same optimizer to float64 master weights
        for n, p in trainable.items():
            reference[n].grad = p.grad.double()
        if step == 0:
            ref_optimizer = torch.optim.AdamW(list(reference.values()), lr=LR_DPO, weight_decay=0.0)
        ref_optimizer.step()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in trainable.items():
        moved = (p.detach().double() - before[n].double()).norm()
        expected = (reference[n].detach() - before[n].double()).norm()
        assert expected > 0 and abs(moved / expected - 1) < 1e-3, (n, float(moved / expected))


def test_a_stage_starts_from_the_saved_adapter_exactly_under_bf16(tiny_model, tmp_path):
    first = _trainer(tiny_model, tmp_path / "a")
    with torch.no_grad():  # an adapter whose values bf16 cannot hold exactly
        for p in first.model.parameters():
            if p.requires_grad:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1 + 0.01)
    first.model.save_pretrained(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    second = _trainer(tiny_model, tmp_path / "b", init_from=tmp_path / "adapter")
    loaded = {n: p for n, p in second.model.named_parameters() if p.requires_grad}
    for key, value in saved.items():
        name = next(n for n in loaded if n.replace(".default", "") == key)
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name].detach(), value), key


def test_frozen_weights_stay_in_the_compute_dtype_with_the_upcast_paths_loss(tiny_model):
    from peft import prepare_model_for_kbit_training

    ours = attach(prepare_base(_bf16_4bit(tiny_model), gradient_checkpointing=True), LoraConfig(r=8, alpha=16))
    frozen = {n: p.dtype for n, p in ours.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen and all(d == torch.bfloat16 for d in frozen.values()), frozen
    upcast = attach(prepare_model_for_kbit_training(_bf16_4bit(tiny_model), use_gradient_checkpointing=False),
                    LoraConfig(r=8, alpha=16))
    assert any(p.dtype == torch.float32 for p in upcast.parameters() if not p.requires_grad)  # what peft does
    upcast.load_state_dict(ours.state_dict(), strict=False)
    ours.train()
    upcast.train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(**batch).loss, upcast(**batch).loss
    a.backward()  # checkpointed layers still reach the adapter: input gradients are on
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert abs(a.item() - b.item()) <= 0.02 * abs(b.item()), (a.item(), b.item())
