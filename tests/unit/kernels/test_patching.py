"""apply_kernels on tiny peft-wrapped Llama/Qwen2/Mistral models: same losses and gradients as unpatched."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import finetune.kernels.hf_forwards as hf
from finetune.model.kernels import KERNEL_FIELDS, apply_kernels, check_kernel_support
from finetune.model.loss_heads import DPO_OUTPUTS, install_compact_fused_head

ALL_ON = SimpleNamespace(**{f: True for f in KERNEL_FIELDS})
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(model_type: str, dropout: float = 0.0):
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, param in peft_model.named_parameters():  # non-zero B so every LoRA branch matters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return peft_model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels[1, -2:] = -100
    return ids, mask, labels


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts the fused ops the patched forwards call (to prove the fast paths ran, not the fallbacks)."""
    counts: dict[str, int] = {}
    for name in ("lora_linear", "lora_mlp", "lora_qkv", "rms_norm", "apply_rope"):
        original = getattr(hf, name)

        def counting(*args, _name=name, _fn=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(hf, name, counting)
    return counts


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_patched_model_matches_unpatched(model_type, calls):
    plain = _tiny(model_type)
    fused = copy.deepcopy(plain)
    report = apply_kernels(fused, ALL_ON)
    # fused_ce patches no module: the loss heads own it (finetune.model.loss_heads, tests/unit/test_patches.py)
    assert {line.split(":")[0] for line in report} == set(KERNEL_FIELDS) - {"fused_ce"}
    assert not hasattr(fused.get_base_model(), "_finetune_orig_forward")
    ids, mask, labels = _batch()
    out_plain = plain(input_ids=ids, attention_mask=mask, labels=labels)
    out_fused = fused(input_ids=ids, attention_mask=mask, labels=labels)
    # 2 layers: 5 norms (2 per layer + final), 2 MLPs, 2 fused QKV, 2 o_proj
    assert calls == {
        "rms_norm": 5,
        "apply_rope": 2,
        "lora_qkv": 2,
        "lora_linear": 2,
        "lora_mlp": 2,
    }
    torch.testing.assert_close(out_fused.loss, out_plain.loss, rtol=1e-5, atol=1e-6)
    out_plain.loss.backward()
    out_fused.loss.backward()
    g_plain, g_fused = _grads(plain), _grads(fused)
    assert g_plain.keys() == g_fused.keys() and len(g_plain) == 2 * 7 * 2
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without labels: logits as usual
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with fused.disable_adapter(), plain.disable_adapter():  # DPO's reference pass
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_dropout_falls_back_and_matches(calls):
    """LoRA dropout in training: lora_linear applies it (same RNG order as peft), fused blocks step aside."""
    plain = _tiny("llama", dropout=0.2)
    fused = copy.deepcopy(plain)
    apply_kernels(fused, ALL_ON)
    plain.train()
    fused.train()
    ids, mask, labels = _batch()
    torch.manual_seed(5)
    loss_plain = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.manual_seed(5)
    loss_fused = fused(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-6)
    assert "lora_mlp" not in calls and "lora_qkv" not in calls and calls["lora_linear"] == 2 * 7
    loss_plain.backward()
    loss_fused.backward()
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(fused)[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunked_ce", [False, True])
def test_dpo_logps_and_idempotence(chunked_ce):
    """DPO's log-probs as a stage computes them on a patched model: trl's fused LM head (added by DPOTrainer), the
    kernels, our compact head on top (finetune.model.patches' order)."""
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny("llama")
    ids, mask, labels = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        lab = labels[:, 1:]
        expected = torch.where(lab != -100, logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    add_fused_lm_head(model.get_base_model(), outputs=DPO_OUTPUTS)
    apply_kernels(model, ALL_ON)
    assert apply_kernels(model, SimpleNamespace(rmsnorm=True))[0].startswith("rmsnorm: 0 ")  # already patched
    install_compact_fused_head(model, chunked_ce=chunked_ce)  # kernels.fused_ce: our chunked CE, else trl's kernel
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    got = out.log_probs.sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        valid = lab != -100
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(out.entropy[valid], entropy[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.mean_logits[valid], logits[:, :-1].float().mean(-1)[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.is_top1[valid], (logits[:, :-1].argmax(-1) == lab)[valid])


def test_nothing_enabled_is_a_no_op():
    model = _tiny("llama")
    assert apply_kernels(model, SimpleNamespace()) == []
    assert not hasattr(model.get_base_model(), "_finetune_orig_forward")


def test_check_kernel_support_messages():
    lora = SimpleNamespace(use_dora=True, lora_bias=False, target_modules=["q_proj", "lm_head"])
    errors = check_kernel_support("gemma", lora)
    assert any("'gemma' is not supported" in e for e in errors)
    assert any("DoRA" in e and "use_dora: false" in e for e in errors)
    assert any("lm_head" in e for e in errors)
    assert check_kernel_support("qwen2", {"use_dora": False, "lora_dropout": 0.0, "bias": "all"}) == []
    # the fused blocks have no dropout: refused instead of silently falling back in every step (lora_linear has it)
    dropout = check_kernel_support("qwen2", {"use_dora": False, "lora_dropout": 0.1, "bias": "all"})
    assert len(dropout) == 1 and "lora_mlp, lora_qkvo" in dropout[0] and "set lora.dropout: 0" in dropout[0]
    assert check_kernel_support("qwen2", {"lora_dropout": 0.1}, SimpleNamespace(lora_linear=True)) == []
    only_norm = SimpleNamespace(rmsnorm=True)
    assert check_kernel_support("llama", lora, only_norm) == []
    assert check_kernel_support("llama", None, SimpleNamespace(lora_mlp=True))[0].startswith("kernels (lora_mlp)")
    with pytest.raises(ValueError, match="not supported"):
        model = _tiny("llama")
        model.get_base_model().config.model_type = "gemma"
        apply_kernels(model, ALL_ON)
