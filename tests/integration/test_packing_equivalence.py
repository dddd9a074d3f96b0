"""Padding-free packing is exact: per-sample logits and losses of packed rows equal those of each sample alone.

The packed rows go through the very path training uses: our dataset (input_ids, labels, seq_lengths) -> trl's
padding-free collator (position ids restarting per sample, no attention mask) -> the model, on CPU with sdpa and
eager attention (transformers detects the sample boundaries from the position ids). A control shows the comparison
can fail: the same rows with plain 0..n-1 positions attend across samples and change the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import apply_template, build_dataset
from finetune.data.packing import unpack
from finetune.recipe.schema import DataConfig

TOL = 1e-5  # float32 on CPU; measured differences are ~1e-7


def conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        turns = 1 + i % 3  # 1 to 3 exchanges: samples of different lengths
        messages = []
        for t in range(turns):
            messages += [{"role": "user", "content": f"add {i % 7} {t}"},
                         {"role": "assistant", "content": str(i % 7 + t)}]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def packed(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("pack") / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(24)))
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    data = DataConfig(train=[{"path": str(path)}], max_length=128, packing=True, cache_dir=None)
    apply_template(tok, data)
    return tok, build_dataset(data, tok, "sft", seed=0, split="train")


def sample_loss(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy of one sample over its labelled tokens."""
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_losses_equal_unpacked(tiny_model, packed, attn):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, ds = packed
    rows = [ds[i] for i in range(3)]
    samples = [s for row in rows for s in unpack(row)]
    assert len(samples) > len(rows) and all(len(r["seq_lengths"]) > 1 for r in rows)  # really packed
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=attn, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        control = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # positions 0..n-1, no restart
        start, worst, control_gap, losses, counts = 0, 0.0, 0.0, [], []
        for ids, labels in samples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            piece = out.logits[0, start : start + len(ids)]
            worst = max(worst, (piece - alone).abs().max().item())
            control_gap = max(control_gap, (control[start : start + len(ids)] - alone).abs().max().item())
            assert sample_loss(piece, labels).item() == pytest.approx(sample_loss(alone, labels).item(), abs=TOL)
            losses.append(sample_loss(alone, labels) * sum(t != -100 for t in labels[1:]))
            counts.append(sum(t != -100 for t in labels[1:]))
            start += len(ids)
    assert worst < TOL, f"packed logits differ from unpacked by {worst}"
    assert control_gap > 1e-2, "control: without restarting positions the samples should see each other"
    # The batch loss the trainer optimises is the token-weighted mean of the samples' losses.
    assert out.loss.item() == pytest.approx((sum(losses) / sum(counts)).item(), abs=TOL)


def test_trainer_loss_on_packed_batch_equals_unpacked(tiny_model, packed, tmp_path):
    """trl's SFTTrainer.compute_loss (the training path, which must turn the KV cache off for the boundaries to be
    detected) gives the packed batch the loss of the samples computed one by one."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok, ds = packed
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert model.config.use_cache  # the default that would hide the packing from the mask code
    args = SFTConfig(output_dir=str(tmp_path), padding_free=True, max_length=None, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    rows = [ds[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        total, count = 0.0, 0
        for ids, labels in (s for row in rows for s in unpack(row)):
            n = sum(t != -100 for t in labels[1:])
            total += sample_loss(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0], labels).item() * n
            count += n
    assert loss == pytest.approx(total / count, abs=TOL)


def test_sft_run_with_packing_learns(tiny_model, tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(48)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: packed
model: {{name_or_path: {tiny_model}, dtype: float32}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {data}}}], max_length: 96, packing: true, cache_dir: {tmp_path / 'cache'}}}
training: {{max_steps: 16, micro_batch_size: 2, learning_rate: 1.0e-2, logging_steps: 2, seed: 1}}
output: {{dir: {tmp_path / 'run'}}}
""")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "packed into" in result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
