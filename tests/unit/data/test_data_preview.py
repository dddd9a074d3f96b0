"""`ft data preview`: marked samples, counts, histogram and checks, from the tokenizer alone."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from finetune.cli import app


def recipe(tmp_path, tiny_model, train, extra="", template="tokenizer"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
name: preview
model: {{name_or_path: {tiny_model}, dtype: float32}}
data:
  train: [{{path: {train}}}]
  max_length: 40
  cache_dir: null
  template: {template}
{extra}
""")
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything loads model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("ft data preview must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_preview_marks_trained_tokens_and_passes_checks(tmp_path, tiny_model, addition_data, no_model):
    result = CliRunner().invoke(app, ["data", "preview", str(recipe(tmp_path, tiny_model, addition_data["train"])),
                                      "-n", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("--- sample ") == 2 and "--- sample 1 of 64: 2" in out
    assert "<|im_start|>assistant\n«" in out and "<|im_end|>»" in out  # the answer and its end-of-turn, marked
    assert "«...» marks trained tokens" in out
    assert "lengths in tokens (64 samples, max_length 40):" in out and "#" in out
    assert "0 truncated" in out and "trained" in out
    assert "ok   end-of-turn token <|im_end|> carries a label in every assistant turn (64/64 kept it)" in out
    assert "ok   pad token <|pad|> (0) differs from eos <|im_end|> (3)" in out
    assert "ok   no sample is fully masked" in out


def test_preview_colours_on_request(tmp_path, tiny_model, addition_data):
    result = CliRunner().invoke(app, ["data", "preview", str(recipe(tmp_path, tiny_model, addition_data["train"])),
                                      "-n", "1", "--color"])
    assert result.exit_code == 0, result.output
    assert "\x1b[" in result.output and "«" not in result.output


def test_failed_checks_exit_1(tmp_path, tiny_model, write):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    jinja = tmp_path / "noeot.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    path = recipe(tmp_path, tiny_model, write("d.jsonl", rows), template=str(jinja))
    result = CliRunner().invoke(app, ["data", "preview", str(path)])
    assert result.exit_code == 1, result.output
    assert "FAIL end-of-turn token (none found) carries a label in every assistant turn (0/1 kept it)" in result.output
    no_answer = write("n.jsonl", [rows[0], {"messages": [{"role": "user", "content": "q"}]}])
    result = CliRunner().invoke(app, ["data", "preview", str(recipe(tmp_path, tiny_model, no_answer))])
    assert result.exit_code == 1 and "no assistant turn" in result.output and "(line 2)" in result.output


def test_preview_of_a_dpo_stage(tmp_path, tiny_model, addition_data, write):
    pairs = write("p.jsonl", [{"prompt": "add 1 2", "chosen": "3", "rejected": "4"}])
    stages = f"""stages:
  - {{name: sft, kind: sft}}
  - name: dpo
    kind: dpo
    data: {{train: [{{path: {pairs}}}], cache_dir: null}}
"""
    path = recipe(tmp_path, tiny_model, addition_data["train"], stages)
    result = CliRunner().invoke(app, ["data", "preview", str(path), "--stage", "dpo"])
    assert result.exit_code == 0, result.output
    assert "--- pair 1 of 1" in result.output
    assert "[chosen, 2 tokens] 3<|im_end|>" in result.output and "[rejected, 2 tokens] 4<|im_end|>" in result.output


def test_unknown_stage_is_a_clear_error(tmp_path, tiny_model, addition_data):
    result = CliRunner().invoke(app, ["data", "preview", str(recipe(tmp_path, tiny_model, addition_data["train"])),
                                      "--stage", "nope"])
    assert result.exit_code == 1 and "--stage nope: the recipe has no such stage (stages: sft)" in result.output
