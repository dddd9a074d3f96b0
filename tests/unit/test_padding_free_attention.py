"""Padding-free rows' attention, chosen per device: flash-attention 2 or torch's varlen kernel on CUDA (fp16/bf16),
per-sample sdpa elsewhere; whichever runs, the loss of a packed row equals the loss of the same samples padded."""

from __future__ import annotations

import pytest
import torch

from finetune.model import attention
from finetune.model.attention import FLASH, NAME, VARLEN, choose_padding_free_attention, use_padding_free_attention

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(("current", "device", "dtype", "flash", "varlen", "chosen", "why"), [
    ("sdpa", "cuda", BF16, True, None, FLASH, "flash-attn is installed"),
    ("sdpa", "cuda", torch.float16, False, None, VARLEN, "flash-attn is not installed"),
    ("sdpa", "cuda", BF16, False, "torch 2.3 has no varlen_attn", NAME, "no varlen kernel here: torch 2.3 has no"),
    ("sdpa", "cuda", FP32, True, None, NAME, "float32 needs sdpa"),
    ("sdpa", "cpu", BF16, True, None, NAME, "no CUDA"),
    (FLASH, "cuda", BF16, True, None, FLASH, "as loaded"),
    ("eager", "cuda", BF16, True, None, None, "no padding-free path"),
])
def test_the_choice_and_its_reason(current, device, dtype, flash, varlen, chosen, why):
    """`varlen`: why torch's varlen kernel cannot run (None: it can)."""
    name, reason = choose_padding_free_attention(current, device, dtype, flash, varlen)
    assert name == chosen and why in reason


def _batches(tiny_model, addition_data):
    import json

    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(tiny_model)
    feats = []
    for line in addition_data["train"].read_text().splitlines()[:4]:
        enc = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        feats.append({"input_ids": enc["input_ids"],
                      "labels": [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"],
                                                                   strict=True)]})
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(feats)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(feats)
    return packed, padded


@pytest.mark.parametrize("forced", [None, VARLEN], ids=["chosen-here", "varlen-forced"])
def test_packed_loss_equals_padded_loss(tiny_model, addition_data, monkeypatch, forced):
    """On this CPU the choice is per-sample sdpa; forcing the varlen path shows that it steps aside off CUDA (torch's
    kernel is never called) with the same loss and gradients."""
    from transformers import AutoModelForCausalLM

    packed, padded = _batches(tiny_model, addition_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model.zero_grad()
    ref = model(**padded, use_cache=False).loss
    ref.backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    if forced:
        monkeypatch.setattr(attention, "choose_padding_free_attention", lambda *a: (forced, "forced by the test"))
        import torch.nn.attention.varlen as varlen

        monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: pytest.fail("varlen_attn called off CUDA"))
    why = use_padding_free_attention(model)
    assert model.config._attn_implementation == (forced or NAME)
    assert why == ("forced by the test" if forced else "sdpa per sample (no CUDA)")
    model.zero_grad()
    loss = model(**packed, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_the_attention_path_that_ran_is_counted(tiny_model, addition_data):
    """A packed row with its boundaries is computed per sample, also when only its position_ids carry them (trl 1.13's
    collator); one whose boundaries never arrive falls back to sdpa with a mask over the whole row, which the counts
    show (the banner would still name the padding-free path)."""
    from transformers import AutoModelForCausalLM

    packed, padded = _batches(tiny_model, addition_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    use_padding_free_attention(model)
    layers = model.config.num_hidden_layers
    attention.attention_calls(reset=True)
    with torch.no_grad():
        loss = model(**packed, use_cache=False).loss
        assert attention.attention_calls(reset=True) == {"sdpa per sample": layers}
        model(**padded, use_cache=False)
        assert attention.attention_calls(reset=True) == {"sdpa with mask (padded batch)": layers}
        positions_only = {k: v for k, v in packed.items() if not k.startswith(("cu_seq_lens", "max_length", "seq_idx"))}
        torch.testing.assert_close(model(**positions_only, use_cache=False).loss, loss)
        assert attention.attention_calls(reset=True) == {"sdpa per sample": layers}
        lost = {k: v for k, v in positions_only.items() if k != "position_ids"}
        model(**lost, use_cache=False)
    assert attention.attention_calls() == {"sdpa with mask (no sample boundaries)": layers}
