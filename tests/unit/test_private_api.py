"""The private library names finetune touches (finetune/model/private_api.py) still exist, each in a test of its own
name; and our copy of trl's SFT loss bookkeeping still does what trl's does."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from finetune.model import loss_heads
from finetune.model.private_api import PRIVATE, TESTED

ROOT = Path(__file__).resolve().parents[2]


def _resolve(name: str):
    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)  # AttributeError names the missing part
    return obj


@pytest.mark.parametrize("entry", [p for p in PRIVATE if p.kind == "import"], ids=lambda p: p.name)
def test_private_name_exists(entry):
    assert _resolve(entry.name) is not None


def _rows():
    return [{"prompt": [{"role": "user", "content": f"add {a} {b}"}],
             "chosen": [{"role": "assistant", "content": str(a + b)}],
             "rejected": [{"role": "assistant", "content": f"it is {a + b + 1}"}]} for a, b in [(1, 2), (3, 4)]]


@pytest.fixture(scope="module")
def instances(tiny_model, tmp_path_factory):
    """One instance of each class whose instance attributes PRIVATE lists, keyed by `module:Class`."""
    import bitsandbytes as bnb
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = tmp_path_factory.mktemp("private_api")

    def model():
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))

    sft = SFTTrainer(model=model(), args=SFTConfig(output_dir=str(out / "sft"), use_cpu=True, report_to=[]),
                     train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]), processing_class=tok)
    dpo = DPOTrainer(model=model(), args=DPOConfig(output_dir=str(out / "dpo"), use_cpu=True, report_to=[]),
                     train_dataset=Dataset.from_list(_rows()), processing_class=tok)
    lm = sft.model.get_base_model()
    lora = lm.model.layers[0].self_attn.q_proj
    return {"trl:SFTTrainer": sft, "trl:DPOTrainer": dpo, "transformers:PretrainedConfig": lm.config,
            "transformers.models.llama.modeling_llama:LlamaRMSNorm": lm.model.norm,
            "peft.tuners.lora:Linear": lora, "bitsandbytes.nn:Linear4bit": bnb.nn.Linear4bit(64, 32)}


@pytest.mark.parametrize("entry", [p for p in PRIVATE if p.kind == "instance"], ids=lambda p: p.name)
def test_private_attribute_exists(entry, instances):
    owner, attribute = entry.name.rsplit(".", 1)
    instance = instances[owner]
    assert isinstance(instance, _resolve(owner)), owner
    assert hasattr(instance, attribute), f"{owner} instances have no {attribute} any more ({entry.where}: {entry.why})"


def test_tested_versions_are_the_pinned_ones():
    """The versions private_api.py names are the ones constraints.txt pins, or the floor (the ones these tests ran
    with: `make test` and `make test-floor`)."""
    from importlib.metadata import version

    from finetune.model.private_api import FLOOR

    assert {name: version(name) for name in TESTED} in (TESTED, FLOOR)
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert {name: pins[name] for name in TESTED} == TESTED


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_label_loss_trainer_bookkeeping_matches_trl(tiny_model, addition_data, tmp_path, padding_free, monkeypatch):
    """LabelLossSFTTrainer.compute_loss re-does trl's bookkeeping after the loss (the DDP loss scale, the num_tokens
    count): run trl's and ours on the same batches, as if on 2 processes, and compare loss and counts."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None,
                       padding_free=padding_free, average_tokens_across_devices=True)
    trainer = loss_heads.trainer_class()(model=model, args=config, processing_class=tok,
                                         train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]))
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    rows = [json.loads(line) for line in addition_data["train"].read_text().splitlines()[:6]]
    batches = [trainer.data_collator([{"input_ids": tok.apply_chat_template(r["messages"], tokenize=True,
                                                                           return_dict=True)["input_ids"]}
                                      for r in rows[i:i + 3]]) for i in (0, 3)]

    def run():
        trainer._total_train_tokens = 0
        trainer._metrics["train"].clear()
        losses = [trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=torch.tensor(50)).item()
                  for b in batches]
        return losses, trainer._total_train_tokens, list(trainer._metrics["train"]["num_tokens"])

    trl_losses, trl_tokens, trl_metric = run()  # no label-positions head yet: trl's own compute_loss
    loss_heads.install(trainer.model)
    ours, tokens, metric = run()
    assert trl_tokens > 0 and tokens == trl_tokens and metric == trl_metric == [trl_tokens]
    assert ours == pytest.approx(trl_losses, rel=1e-5)


def test_each_copy_names_a_test_that_exists():
    """A copy of library code is only listed with the test that compares it with the library: that test exists."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    guarded = {p.guarded_by for p in PRIVATE if p.guarded_by}
    assert guarded
    for test in guarded:
        path, name = test.split("::")
        assert f"def {name}(" in (root / path).read_text(encoding="utf-8"), test
