"""`ft train --dry-run`: loads tokenizer, data and model, prints samples, tokens, steps and memory; trains nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from resume_helpers import train_here, write_recipe

from finetune.recipe.schema import LoraConfig, TrainingConfig
from finetune.stages.dryrun import total_steps


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, addition_data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], max_steps=None, epochs=2,
                          gradient_accumulation_steps=2)
    result = train_here(str(recipe), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: nothing is trained" in out
    assert "«" in out and "<|im_start|>user" in out  # one rendered sample, trained tokens marked
    # 64 rows, micro batch 4 x accumulation 2 = 8 steps per epoch, 2 epochs
    assert "= 8 steps per epoch -> 16 steps (2.00 epochs)" in out
    assert "memory for 4 x " in out and "plan: 1 stage(s), 16 optimizer steps" in out
    assert not (tmp_path / "runs").exists()


def test_step_count_matches_the_trainer_rounding():
    t = TrainingConfig(micro_batch_size=4, gradient_accumulation_steps=3, epochs=1.5)
    # 50 rows -> 13 micro batches -> 5 steps per epoch (the last one with 1 micro batch) -> ceil(7.5) = 8
    assert total_steps(50, t) == 8
    assert total_steps(50, TrainingConfig(max_steps=3)) == 3


def _saved_bytes(model, **inputs) -> int:
    """Bytes of the floating tensors the forward keeps for backward (each storage once, weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(**inputs)
    return sum(saved.values())


@pytest.mark.parametrize(("dtype", "dropout", "lean"), [(torch.float32, 0.0, False), (torch.bfloat16, 0.0, False),
                                                        (torch.bfloat16, 0.05, False), (torch.float32, 0.0, True),
                                                        (torch.float32, 0.05, True), (torch.bfloat16, 0.0, True)])
def test_estimate_of_the_label_loss_path_by_hand_and_against_what_autograd_keeps(tmp_path, dtype, dropout, lean):
    """The path that runs in SFT: 4-bit base, float32 LoRA on every projection, the label-positions loss head, under
    bf16 autocast (a GPU run) or in fp32 (the CPU). Each part by hand for the tiny model, then the kept activations and
    the loss head's saved gradient against the tensors autograd actually keeps."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tinymodels import build_char_model
    from transformers import AutoModelForCausalLM

    from finetune.model import loss_heads
    from finetune.model.adapters import attach, prepare_base
    from finetune.model.loading import bnb_config
    from finetune.recipe.schema import QuantizationConfig, Recipe
    from finetune.stages.memory import ModelShape, estimate

    folder = build_char_model(tmp_path / "m", hidden=128, layers=3)  # intermediate 256, 4 heads, 2 kv
    precision = "fp32" if dtype == torch.float32 else "bf16"
    quant = QuantizationConfig(mode="nf4", compute_dtype="float32" if dtype == torch.float32 else "bfloat16")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=bnb_config(quant, dtype),
                                                device_map={"": "cpu"})
    model = attach(prepare_base(base, False), LoraConfig(r=8, dropout=dropout))
    loss_heads.install(model)
    model.train()
    recipe = Recipe(model={"name_or_path": str(folder), "dtype": str(dtype).split(".")[1]}, quantization=quant,
                    lora={"r": 8, "dropout": dropout}, data={"train": [{"path": "x.jsonl"}]},
                    training={"precision": precision, "optimizer": "adamw_torch", "lean_saves": lean})
    ids = torch.randint(5, 90, (4, 96), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :48] = -100
    labelled = int((labels[:, 1:] != -100).sum())  # 4 x 48
    a = 4 if dtype == torch.float32 else 2
    memory = estimate(ModelShape.of(model.config), recipe=recipe, training=recipe.training, kind="sft", sequences=4,
                      seq_len=96, labelled=labelled, act_bytes=a)

    # by hand: hidden 128, q 128, kv 64, intermediate 256, 3 layers, r 8, 384 tokens, 192 labelled
    v = model.config.vocab_size  # the character tokenizer's
    linear = 3 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256)  # q, o; k, v; gate, up, down
    assert memory.quantized_weights == linear // 2 + linear // 64 + 4 * -(-linear // 64 // 256)  # double quant
    assert memory.frozen_weights == (v * 128 * 2 + 7 * 128) * a  # embeddings, LM head, 7 norms, in their dtype
    lora = 3 * 8 * (2 * (128 + 128) + 2 * (128 + 64) + 3 * (128 + 256))
    assert memory.adapter == lora * (4 + 4 + 8)  # float32 weight, gradient, two Adam moments
    adapters_in = 5 * 128 + 128 + 256 if (a == 2 or dropout) else 2 * 128 + 128 + 256
    per_token = (8 * 128 + 8 + 4 * 4 + a * (2 * 128 + 2 * 64 + 3 * 256 + adapters_in + 7 * 8)
                 + (4 * (5 * 128 + 128 + 256) if dropout else 0))
    if lean:  # `training.lean_saves`: norm outputs (float32, no dropout) and the MLP's activation and product
        per_token -= a * (2 * 128 + 2 * 256) if (a == 4 and not dropout) else a * 256
    assert memory.kept_activations == 3 * 384 * per_token and memory.recomputed_layer == 0
    rows = labelled  # a tiny vocabulary: all 192 labelled tokens in one chunk of logits
    assert memory.loss == (384 * 128 * (4 + a) + labelled * 128 * (a + 4)
                           + rows * v * (4 if a == 4 else loss_heads.CHUNK_BYTES_PER_LOGIT))
    # what autograd keeps: the layers, the final norm's float32 input and the head's float32 gradient [labelled, H]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        measured = _saved_bytes(model, input_ids=ids, labels=labels, **{loss_heads.FLAG: True})
    if lean:  # its hooks act instead of any outer ones: what it does not keep is counted by it
        from finetune.model import lean_saves

        lean_saves.install(model.get_base_model())
        lean_saves.lean_counts(reset=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(input_ids=ids, labels=labels, **{loss_heads.FLAG: True})
        dropped = lean_saves.lean_counts()["dropped_bytes"]
        assert dropped == 3 * 384 * (a * (2 * 128 + 2 * 256) if (a == 4 and not dropout) else a * 256)
        measured -= dropped
    kept = memory.kept_activations + 384 * 128 * 4 + labelled * 128 * 4
    # the estimate's few percent too many bytes (e.g. the first layer's norm input, which needs no gradient) are the
    # same bytes with lean saves, of a smaller total
    slack = 0.15 if lean else 0.1
    assert (1 - slack) * measured <= kept <= (1 + slack) * measured, (kept, measured)
