"""`ft generate`: what PATH may be, prompts files, and chat-formatted streamed generation on a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.export.generate import generate, load, read_prompts


def test_read_prompts_one_per_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("add 1 2\n\n  add 3 4  \n")
    assert read_prompts(f) == ["add 1 2", "add 3 4"]
    f.write_text("\n\n")
    with pytest.raises(FinetuneError, match="has no prompt"):
        read_prompts(f)
    with pytest.raises(FinetuneError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_paths_that_hold_nothing_loadable(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(FinetuneError, match="neither a run .* nor a model"):
        load(tmp_path)
    with pytest.raises(FinetuneError, match="--stage applies to run folders"):
        load(tmp_path, stage="sft")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(FinetuneError, match="named in adapter_config.json is not here; pass its folder with --base"):
        load(tmp_path)


def test_generate_streams_the_chat_formatted_answer(tiny_model, capsys, monkeypatch):
    loaded = load(tiny_model)
    answer = generate(loaded, "add 1 2", max_new_tokens=5)
    assert 0 < len(answer) and answer in capsys.readouterr().out
    assert generate(loaded, "add 1 2", max_new_tokens=5, stream=False) == answer  # greedy: deterministic
    seen = {}
    original = loaded.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    generate(loaded, "add 1 2", max_new_tokens=2, system="Be brief.", stream=False)
    expected = loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 1 2"}],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert seen["input_ids"][0].tolist() == list(expected) and seen["do_sample"] is False


def test_cli_needs_a_prompt(tiny_model):
    result = CliRunner().invoke(app, ["generate", str(tiny_model)])
    assert result.exit_code == 2 and "at least one --prompt" in result.output
