"""The fast paths compute what trl computes: label-positions loss, per-sample attention, compact DPO head."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.model import loss_heads
from finetune.model.attention import NAME, use_per_sample_attention


def _features(tokenizer, path, n=4):
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    out = []
    for r in rows:
        enc = tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = enc["input_ids"]
        out.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, enc["assistant_masks"],
                                                                                 strict=True)]})
    return out


def _trainer(tiny_model, padding_free, tmp_path, lora_dtype=None):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # random B (not peft's zeros) so that every adapter weight gets a gradient
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=None,
                       padding_free=padding_free, remove_unused_columns=False)
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]),
                      processing_class=tok), tok


def _loss_and_grads(trainer, compute, batch):
    n_items = (batch["labels"][:, 1:] != -100).sum()
    loss = compute(trainer, trainer.model, dict(batch), num_items_in_batch=n_items)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_label_positions_loss_matches_trl(tiny_model, addition_data, tmp_path, padding_free):
    trainer, tok = _trainer(tiny_model, padding_free, tmp_path)
    batch = trainer.data_collator(_features(tok, addition_data["train"]))
    assert ("position_ids" in batch) == padding_free
    ref_loss, ref_grads = _loss_and_grads(trainer, type(trainer).compute_loss, batch)

    assert loss_heads.unsupported_reason(trainer.model) is None
    loss_heads.install(trainer.model)
    loss, grads = _loss_and_grads(trainer, loss_heads.trainer_class().compute_loss, batch)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    # the patched model still computes logits for generation and plain calls
    assert trainer.model(input_ids=batch["input_ids"][:, :5]).logits.shape[-1] == len(tok)


def test_label_loss_refuses_models_that_transform_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert "trained" in loss_heads.unsupported_reason(model)  # a trainable head needs its weight gradient
    model.requires_grad_(False)
    assert loss_heads.unsupported_reason(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in loss_heads.unsupported_reason(model)


def test_per_sample_attention_matches_masked_sdpa(tiny_model, addition_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(tiny_model)
    feats = _features(tok, addition_data["train"])
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(feats)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(feats)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")

    def run(batch):
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_logits, ref_grad = run(packed)
    ref_padded = model(**padded, use_cache=False).loss.detach()
    assert use_per_sample_attention(model) and model.config._attn_implementation == NAME
    logits, grad = run(packed)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    # without sample boundaries (padded batches, generation) it is sdpa with its mask
    torch.testing.assert_close(model(**padded, use_cache=False).loss.detach(), ref_padded)

    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    assert not use_per_sample_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_compact_fused_head_matches_trl_dpo(tiny_model, tmp_path, padding_free, monkeypatch):
    """DPO: trl's fused head on the labelled positions only (and, padding-free, the padded batch run as one row of
    samples with per-sample attention) gives trl's loss, metrics and gradients."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rows = [{"prompt": [{"role": "user", "content": f"add {a} {b}" + " please" * a}],
             "chosen": [{"role": "assistant", "content": str(a + b)}],
             "rejected": [{"role": "assistant", "content": f"it is {a + b + 1} or so" * (1 + b % 2)}]}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]
    config = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=4,
                       gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def run():
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}  # a running total
        return loss.detach(), torch.autograd.grad(loss, params), metrics

    ref_loss, ref_grads, ref_metrics = run()
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padding and prompts: positions to skip
    if padding_free:
        assert use_per_sample_attention(trainer.model)
        calls = []
        real = loss_heads._padding_free_kwargs
        monkeypatch.setattr(loss_heads, "_padding_free_kwargs", lambda kw: calls.append(real(kw)) or calls[-1])
    loss_heads.install_compact_fused_head(trainer.model, padding_free=padding_free)
    loss, grads, metrics = run()
    if padding_free:
        # the policy and the reference forward each ran one row holding exactly the batch's real tokens
        assert len(calls) == 2 and all(c is not None for c in calls)
        row = calls[0][0]["input_ids"]
        assert row.shape == (1, int(batch["attention_mask"].sum()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    assert metrics.keys() == ref_metrics.keys() and "entropy" in metrics
    for key, value in metrics.items():
        assert value == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-5), key
