"""Bad input to `ft export` fails early (before any model load) with a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.export.exports import check_mergeable
from finetune.export.modelcard import _scrub, public_path, public_text
from finetune.export.runstage import open_run

RECIPE = """
name: r
model: {name_or_path: models/none}
data: {train: [{path: train.jsonl}]}
stages:
  - {name: sft, kind: sft}
  - {name: dpo, kind: dpo}
"""


def make_run(tmp_path: Path, finished: tuple[str, ...] = ()) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE)
    for stage in finished:
        (run / stage / "adapter").mkdir(parents=True)
        (run / stage / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        (run / stage / "summary.json").write_text("{}")
    return run


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        open_run(tmp_path / "missing")
    with pytest.raises(FinetuneError, match=r"not a run folder \(no recipe.yaml\)"):
        open_run(tmp_path)


def test_run_without_finished_stage(tmp_path):
    with pytest.raises(FinetuneError, match="has no finished stage yet.*ft train"):
        open_run(make_run(tmp_path))


def test_unknown_and_unfinished_stage(tmp_path):
    run = make_run(tmp_path, finished=("sft",))
    with pytest.raises(FinetuneError, match=r"has no stage 'sfft' \(stages of its recipe: sft, dpo\)"):
        open_run(run, "sfft")
    with pytest.raises(FinetuneError, match=r"stage 'dpo' .* has not finished \(finished: sft\)"):
        open_run(run, "dpo")


def test_default_stage_is_last_finished(tmp_path):
    run = make_run(tmp_path, finished=("sft", "dpo"))
    assert open_run(run).stage.name == "dpo"
    assert open_run(run, "sft").adapter == run / "sft" / "adapter"


def test_tokenizer_is_the_one_saved_with_the_adapter(tmp_path):
    run = open_run(make_run(tmp_path, finished=("sft",)))
    assert run.tokenizer_dir == run.run_dir / "tokenizer"  # runs that saved no tokenizer with the adapter
    (run.adapter / "tokenizer_config.json").write_text("{}")
    assert run.tokenizer_dir == run.adapter  # saved after the recipe's chat template was applied


def test_existing_output_refused_before_any_model_load(tmp_path):
    from finetune.export.exports import export_adapter

    run = open_run(make_run(tmp_path, finished=("sft",)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="already exists; pass --overwrite"):
        export_adapter(run, out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "LORA", "use_dora": True}, "DoRA.*--format adapter"),
        ({"peft_type": "IA3"}, "IA3 adapter cannot be merged"),
        ({"peft_type": "LORA", "lora_bias": True}, "LoRA biases"),
    ],
)
def test_unmergeable_adapters_are_explained(tmp_path, config, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FinetuneError, match=message):
        check_mergeable(tmp_path)


def test_plain_lora_is_mergeable(tmp_path):
    """The adapter_config.json peft writes for a plain LoRA passes; each option merged export refuses, set in that
    same file, is refused (so the keys checked are the ones peft writes, not names of our own)."""
    from peft import LoraConfig

    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    plain = json.loads((tmp_path / "adapter_config.json").read_text())
    refused = {"use_dora": True, "lora_bias": True, "trainable_token_indices": [1]}
    assert refused.keys() <= plain.keys()
    check_mergeable(tmp_path)
    for key, value in refused.items():
        (tmp_path / "adapter_config.json").write_text(json.dumps({**plain, key: value}))
        with pytest.raises(FinetuneError, match="--format adapter"):
            check_mergeable(tmp_path)
    # LoRA on raw parameters (MoE experts, routers) merges either way (tests/unit/test_moe.py, tests/integration/
    # test_model_zoo.py verify Qwen3-MoE and Mixtral merges)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**plain, "target_parameters": ["w"]}))
    check_mergeable(tmp_path, "dequantized")
    check_mergeable(tmp_path, "original")


def test_published_paths_and_secrets(tmp_path):
    assert public_path(str(tmp_path / "data" / "train.jsonl")) == "<local>/train.jsonl"
    assert public_path("~/models/base") == "<local>/base"
    assert public_path("data/quickstart/sft_train.jsonl") == "data/quickstart/sft_train.jsonl"
    assert public_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    token = "hf_" + "a" * 30
    assert _scrub({"a": [f"token {token}", str(tmp_path)]}) == {"a": ["token <redacted>", f"<local>/{tmp_path.name}"]}
    assert _scrub({"tokens": 436, "key": "sk-" + "b" * 30}) == {"tokens": 436, "key": "<redacted>"}
    text = "ft train --set model.name_or_path=/home/me/models/base at https://huggingface.co/a/b, 3/4 nats/token"
    assert public_text(text) == ("ft train --set model.name_or_path=<local>/base at https://huggingface.co/a/b, "
                                 "3/4 nats/token")
