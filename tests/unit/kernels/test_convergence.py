"""Training a tiny 4-bit QLoRA Llama with kernels on and off gives the same run (SFT and DPO losses).

The model is built here (LlamaConfig: hidden 64, 2 layers, vocab 128), saved, and loaded in NF4 with double
quantisation and float32 compute through `BitsAndBytesConfig`; LoRA goes on every linear layer. Both runs start
from identical weights and adapters and see identical batches; on CPU the kernels run their PyTorch paths, so
any difference comes from summation order. Tolerances: per-step loss `rtol=1e-4`; final adapter weights
`atol=1e-4` (AdamW at lr 5e-3, so 8 steps move weights by ~4e-2).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from finetune.model.kernels import KERNEL_FIELDS, apply_kernels
from finetune.model.loss_heads import DPO_OUTPUTS, install_compact_fused_head

STEPS = 8
BETA = 0.5


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _qlora(path, kernels: bool, dpo_head: bool = False):
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    if dpo_head:  # what a DPO stage stacks: trl's fused LM head (DPOTrainer), the kernels, our compact head on top
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=DPO_OUTPUTS)
    report = apply_kernels(model, SimpleNamespace(**{f: kernels for f in KERNEL_FIELDS}))
    assert bool(report) == kernels
    if dpo_head:
        install_compact_fused_head(model)
    model.train()
    return model


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, loss_fn) -> tuple[list[float], dict[str, torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for step in range(STEPS):
        loss = loss_fn(model, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, _adapter(model)


def _batch(step: int, rows: int = 4, seq: int = 16):
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 128, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt tokens are not scored
    return ids, labels


def _sft_loss(model, step: int) -> torch.Tensor:
    ids, labels = _batch(step)
    return model(input_ids=ids, labels=labels).loss


def _logps_unfused(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    lab = labels[:, 1:]
    picked = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(lab != -100, picked, 0.0).sum(-1)


def _logps_fused_head(model, ids, labels) -> torch.Tensor:
    """Per-sequence log-probs the way trl's DPOTrainer asks a patched model for them."""
    return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum(-1)


def _dpo_loss(fused: bool):
    logps = _logps_fused_head if fused else _logps_unfused

    def loss_fn(model, step: int) -> torch.Tensor:
        ids, labels = _batch(step, rows=4)  # rows 0-1 chosen, rows 2-3 rejected
        with torch.no_grad(), model.disable_adapter():
            ref = logps(model, ids, labels)
        pol = logps(model, ids, labels)
        margin = (pol[:2] - ref[:2]) - (pol[2:] - ref[2:])
        return -F.logsigmoid(BETA * margin).mean()

    return loss_fn


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_kernels_on_off_same_training(tiny_llama_dir, objective):
    fn_off = _sft_loss if objective == "sft" else _dpo_loss(fused=False)
    fn_on = _sft_loss if objective == "sft" else _dpo_loss(fused=True)
    plain, fused = _qlora(tiny_llama_dir, False), _qlora(tiny_llama_dir, True, dpo_head=objective == "dpo")
    start = _adapter(plain)
    for name, value in _adapter(fused).items():
        assert torch.equal(value, start[name])
    losses_off, final_off = _train(plain, fn_off)
    losses_on, final_on = _train(fused, fn_on)
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=1e-4, atol=1e-6)
    if objective == "sft":
        assert losses_off[-1] < losses_off[0]  # it does train
    moved = max((final_off[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-2
    for name in final_off:
        torch.testing.assert_close(final_on[name], final_off[name], rtol=0, atol=1e-4, msg=name)
