"""DPO on one 4-bit base: the reference is what the recipe says (sft, base or a path), never silently the base.

A non-trivial "SFT" adapter (random LoRA B, so it really changes the model) is the starting policy. With reference
`sft` the policy and the reference agree at step 0: loss ln 2, reward margins 0. With reference `base` they do not.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch

from finetune.model.loading import load_tokenizer
from finetune.recipe.schema import Recipe
from finetune.stages.common import StageContext
from finetune.stages.dpo import REF, build_trainer, held_out

LN2 = math.log(2)


def pairs(n: int, offset: int = 0):
    """Preference pairs of the addition task in trl's conversational format: correct and short vs wrong or wordy."""
    from datasets import Dataset

    rows = []
    for i in range(offset, offset + n):
        a, b = i % 8, (i * 3) % 8
        rejected = str(a + b + 1) if i % 2 else f"I think it might be {a + b}"
        rows.append({"prompt": [{"role": "user", "content": f"add {a} {b}"}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, tmp_path_factory) -> Path:
    """A saved LoRA adapter with random A and B: it moves the model's log-probs well away from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sft") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


def make(tiny_model, tmp_path, init: Path | None, quant: str = "nf4", steps: int = 2, **dpo):
    """A DPOTrainer built the way `run_dpo` builds it, on the tiny model."""
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(tiny_model), "dtype": "float32"},
        "quantization": {"mode": quant, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": [{"path": "unused.jsonl"}], "max_length": 64},
        "training": {"max_steps": steps, "micro_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1},
        "stages": [{"name": "dpo", "kind": "dpo", "init_from": str(init) if init else "new",
                    "dpo": {"reference": "base", **dpo}}],
        "output": {"dir": str(tmp_path / "run")},
    })
    ctx = StageContext(recipe=recipe, stage=recipe.stages[0], run_dir=tmp_path / "run", init_adapter=init)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model)
    return build_trainer(ctx, tokenizer, pairs(16), pairs(8, 100))


def test_sft_reference_gives_ln2_and_zero_margins_at_step_0(tiny_model, sft_adapter, tmp_path):
    trainer, ref = make(tiny_model, tmp_path, sft_adapter, reference="sft")
    assert ref["adapter"] == str(sft_adapter) and "sft" in ref["description"]
    assert REF in trainer.model.peft_config
    m = held_out(trainer)
    assert m["loss"] == pytest.approx(LN2, abs=1e-6)
    assert abs(m["rewards/margins"]) < 1e-6 and abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/rejected"]) < 1e-6
    # fp32 training: the policy starts from the SFT weights exactly (trl's bf16 cast of 4-bit adapters is undone)
    from safetensors.torch import load_file

    params = dict(trainer.model.named_parameters())
    for key, value in load_file(str(sft_adapter / "adapter_model.safetensors")).items():
        policy = params[f"{key.removesuffix('.weight')}.default.weight"]
        assert policy.dtype == torch.float32 and torch.equal(policy.detach(), value), key

    trainer.train()
    first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in first if "loss" in r and r["step"] >= 1]
    # Step 1 is logged before its update: the trained policy still equals the reference there.
    assert train_rows[0]["step"] == 1 and train_rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(train_rows[0]["rewards/margins"]) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in train_rows), key


def test_base_reference_is_not_the_sft_adapter(tiny_model, sft_adapter, tmp_path):
    trainer, ref = make(tiny_model, tmp_path, sft_adapter, reference="base")
    assert ref["adapter"] is None and REF not in trainer.model.peft_config
    m = held_out(trainer)
    # The SFT adapter moves log-probs, so against the base the margins are clearly non-zero at step 0.
    assert abs(m["rewards/margins"]) > 1e-2, m
    assert abs(m["loss"] - LN2) > 1e-3, m


def test_adapter_path_reference_is_loaded_frozen(tiny_model, sft_adapter, tmp_path):
    """Policy = base (fresh adapter), reference = the adapter folder: the mirror image of the test above."""
    sft_vs_base = held_out(make(tiny_model, tmp_path / "a", sft_adapter, reference="base")[0])
    trainer, ref = make(tiny_model, tmp_path / "b", None, reference=str(sft_adapter))
    assert ref["adapter"] == str(sft_adapter)
    base_vs_sft = held_out(trainer)
    assert base_vs_sft["rewards/margins"] == pytest.approx(-sft_vs_base["rewards/margins"], rel=0.05, abs=1e-3)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if f".{REF}." in n)


def test_one_copy_of_the_4bit_base_in_memory(tiny_model, sft_adapter, tmp_path):
    import bitsandbytes as bnb

    def live_4bit() -> int:
        gc.collect()
        return sum(isinstance(o, bnb.nn.Params4bit) for o in gc.get_objects())

    before = live_4bit()
    trainer, _ = make(tiny_model, tmp_path, sft_adapter, reference="sft")
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down): one model's worth
    assert live_4bit() - before == len(layers)  # nothing else holds 4-bit weights: no second base copy
    assert trainer.ref_model is None
    # policy and reference are two adapters on the same quantized layers
    assert all({"default", REF} <= set(m.lora_A) for m in trainer.model.modules() if hasattr(m, "lora_A"))


def test_reference_stays_frozen_while_the_policy_learns(tiny_model, sft_adapter, tmp_path):
    from safetensors.torch import load_file

    trainer, _ = make(tiny_model, tmp_path, sft_adapter, steps=4, reference="sft")
    before = held_out(trainer)
    trainer.train()
    after = held_out(trainer)
    assert after["rewards/margins"] > before["rewards/margins"] + 1e-3 and after["loss"] < before["loss"]
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    params = dict(trainer.model.named_parameters())
    moved = 0
    for key, value in saved.items():
        name = key.removesuffix(".weight")
        ref, pol = params[f"{name}.{REF}.weight"], params[f"{name}.default.weight"]
        assert torch.equal(ref.detach().float(), value.to(ref.dtype).float()), key  # reference untouched
        moved += not torch.equal(pol.detach().float(), value.to(pol.dtype).float())
    assert moved > len(saved) // 2  # the policy did train


@pytest.mark.parametrize("loss_type, expected", [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_loss_type_reaches_trl(tiny_model, sft_adapter, tmp_path, loss_type, expected):
    """At zero margins hinge is relu(1 - 0) = 1 and IPO is (0 - 1/(2 beta))^2: proves the loss type is applied."""
    trainer, _ = make(tiny_model, tmp_path, sft_adapter, quant="none", reference="sft", loss_type=loss_type, beta=0.1)
    assert held_out(trainer)["loss"] == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_is_conservative_dpo(tiny_model, sft_adapter, tmp_path):
    """One held-out pair against the base reference: loss = -(1-e) log s(z) - e log s(-z) at its margin z."""
    e = 0.2
    trainer, _ = make(tiny_model, tmp_path, sft_adapter, quant="none", reference="base", label_smoothing=e)
    trainer.eval_dataset = trainer.eval_dataset.select([0])
    m = held_out(trainer)
    z = torch.tensor(m["rewards/margins"], dtype=torch.float64)
    assert abs(z.item()) > 1e-2
    expected = -(1 - e) * torch.nn.functional.logsigmoid(z) - e * torch.nn.functional.logsigmoid(-z)
    assert m["loss"] == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_precomputed_reference_matches_the_live_one(tiny_model, sft_adapter, tmp_path, reference):
    live = held_out(make(tiny_model, tmp_path / "live", sft_adapter, reference=reference)[0])
    trainer, ref = make(tiny_model, tmp_path / "pre", sft_adapter, reference=reference, precompute_ref_log_probs=True)
    assert "precomputed" in ref["description"]
    assert REF not in trainer.model.peft_config  # freed after precomputing
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    pre = held_out(trainer)
    for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert pre[key] == pytest.approx(live[key], abs=1e-5), key
    trainer.train()  # trains from the stored columns
    assert trainer.state.global_step == 2


def test_nll_weight_adds_the_mean_nll_of_the_chosen_answers(tiny_model, sft_adapter, tmp_path):
    """loss = ln 2 + w x (mean NLL per chosen token) at step 0 with the sft reference."""
    w = 0.5
    trainer, _ = make(tiny_model, tmp_path, sft_adapter, quant="none", reference="sft", nll_weight=w)
    lengths = [len(ids) for ids in trainer.eval_dataset["chosen_ids"]]
    n = min(lengths)  # keep pairs whose chosen answers have the same token count: per-token mean = sum / n
    trainer.eval_dataset = trainer.eval_dataset.select([i for i, k in enumerate(lengths) if k == n])
    out = trainer.evaluate()
    nll = -out["eval_logps/chosen"] / n
    assert nll > 0.1
    assert out["eval_loss"] == pytest.approx(LN2 + w * nll, abs=1e-4)
