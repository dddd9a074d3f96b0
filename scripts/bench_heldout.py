"""Held-out measures of a trained adapter, computed the same way for every side of the benchmark.

The 4-bit NF4 base (double quantization, float32 compute) is loaded as both tools load it, the side's saved adapter
on top (cast to float32); the labels come from the tokenizer's own assistant mask (`{% generation %}` markers), not
from either tool's data code.
"""

from __future__ import annotations

import json
from pathlib import Path


def _load(model_dir: str, adapter: Path | None, threads: int):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant,
                                                device_map={"": "cpu"})
    if adapter is None:
        return tok, base.eval()
    return tok, PeftModel.from_pretrained(base, str(adapter)).float().eval()


def _answer_logp(model, tok, messages: list[dict]) -> tuple[float, int]:
    """Summed log-probability of the assistant tokens of a conversation and their count."""
    import torch

    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]])
    mask = torch.tensor(enc["assistant_masks"][1:]).bool()
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return float(picked[mask].sum()), int(mask.sum())


def sft_loss(model_dir: str, adapter: Path | None, eval_file: str, threads: int) -> dict[str, float]:
    """Mean cross-entropy over the assistant tokens of the held-out chat rows."""
    import torch

    tok, model = _load(model_dir, adapter, threads)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in Path(eval_file).read_text().splitlines():
            logp, n = _answer_logp(model, tok, json.loads(line)["messages"])
            total, count = total - logp, count + n
    return {"heldout_loss": total / count}


def dpo_loss(model_dir: str, adapter: Path, eval_file: str, threads: int, beta: float) -> dict[str, float]:
    """Held-out DPO sigmoid loss and reward accuracy, reference = the base (adapter disabled), as trained."""
    import math

    import torch

    tok, model = _load(model_dir, adapter, threads)
    losses, wins = [], 0
    with torch.no_grad():
        for line in Path(eval_file).read_text().splitlines():
            row = json.loads(line)
            chosen, rejected = row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
            policy = [_answer_logp(model, tok, m)[0] for m in (chosen, rejected)]
            with model.disable_adapter():
                ref = [_answer_logp(model, tok, m)[0] for m in (chosen, rejected)]
            margin = beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
            losses.append(math.log1p(math.exp(-margin)) if margin > -30 else -margin)
            wins += margin > 0
    return {"heldout_loss": sum(losses) / len(losses), "heldout_reward_accuracy": wins / len(losses)}


def untrained(mode: str, model_dir: str, eval_file: str, threads: int) -> dict[str, float]:
    """The held-out measures before training: the base for SFT; for DPO the policy equals the reference (ln 2)."""
    import math

    if mode == "dpo":
        return {"heldout_loss": math.log(2), "heldout_reward_accuracy": 0.0}
    return sft_loss(model_dir, None, eval_file, threads)
