"""`ft data preview` of tool calls, tool results and reasoning (issue 15, item 2), through the CLI: the trained tokens
marked in the rendering, the counts, what the chat template does with each, and a template that would drop the
tools or calls refused naming the file and line. No model weights load."""

from __future__ import annotations

import json

import pytest
from tinytools import build_tool_model
from typer.testing import CliRunner

from finetune.cli import app

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
ROW = {"messages": [{"role": "user", "content": "Oslo?"},
                    {"role": "assistant", "content": "", "reasoning_content": "Need data.", "tool_calls": [CALL]},
                    {"role": "tool", "content": "-3C"},
                    {"role": "assistant", "content": "Cold.", "reasoning_content": "Below zero."},
                    {"role": "user", "content": "Rome?"},
                    {"role": "assistant", "content": "<think>Mild.</think>Warm."}],
       "tools": [WEATHER]}


@pytest.fixture
def no_model(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("ft data preview must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def preview(tmp_path, model, *args, extra=""):
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n" + json.dumps(ROW)
                    + "\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {{name_or_path: {model}, dtype: float32}}\ndata: {{train: [{{path: {data}}}], "
                      f"max_length: 1024, cache_dir: null, shuffle: false{extra}}}\n")
    return CliRunner().invoke(app, ["data", "preview", str(recipe), "-n", "2", *args])


def test_preview_marks_calls_and_answers_trained_results_masked_past_reasoning_dropped(tmp_path, tiny_model,
                                                                                         no_model):
    result = preview(tmp_path, build_tool_model(tiny_model, tmp_path / "qwen3", "qwen3"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert ("<|im_start|>assistant\n«<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
            "</tool_call><|im_end|>»\n<|im_start|>user\n<tool_response>\n-3C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n«Cold.<|im_end|>»\n") in out  # the loop's reasoning: dropped by the template
    assert "<|im_start|>assistant\n«<think>\nMild.\n</think>\n\nWarm.<|im_end|>»" in out
    assert "tool use: 1 tool calls (trained: they are the assistant's), 1 tool results (masked)" in out
    assert ("reasoning: 3 assistant turns carry it; 1 rendered by the chat template (2 dropped by it); 1 trained, "
            "0 masked (data.train_on_reasoning)") in out
    assert "template: tools column: rendered; tool calls: rendered; tool results: rendered" in out
    assert ("template: reasoning: from the 'reasoning_content' field; kept only on assistant turns after the last "
            "user message") in out
    assert "FAIL" not in out


def test_preview_shows_reasoning_masked_with_train_on_reasoning_false(tmp_path, tiny_model, no_model):
    result = preview(tmp_path, build_tool_model(tiny_model, tmp_path / "qwen3", "qwen3"),
                     extra=", train_on_reasoning: false")
    assert result.exit_code == 0, result.output
    assert "<|im_start|>assistant\n<think>\nMild.\n</think>\n\n«Warm.<|im_end|>»" in result.output
    assert "1 rendered by the chat template (2 dropped by it); 0 trained, 1 masked" in result.output


def test_preview_of_a_template_without_a_reasoning_field_writes_it_inline(tmp_path, tiny_model, no_model):
    result = preview(tmp_path, build_tool_model(tiny_model, tmp_path / "llama", "llama31"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n«{\"name\": \"weather\", \"parameters\": {\"city\": "
            "\"Oslo\"}}<|eot_id|>»<|start_header_id|>ipython<|end_header_id|>\n\n-3C<|eot_id|>") in out
    assert "«<think>\nBelow zero.\n</think>\n\nCold.<|eot_id|>»" in out
    # the template writes a call turn as the call alone: its reasoning (inline content) is not rendered, and said so
    assert "reasoning: 3 assistant turns carry it; 2 rendered by the chat template (1 dropped by it)" in out
    assert "template: reasoning: not read by the template: written inline as <think>...</think>" in out


def test_template_that_ignores_tools_is_reported_with_file_and_line(tmp_path, tiny_model, no_model):
    result = preview(tmp_path, tiny_model)  # the tiny model's ChatML template renders the content only
    assert result.exit_code != 0
    out = " ".join(result.output.split())
    assert "tools.jsonl" in out and "(line 2)" in out, out
    assert ("1 row: the tools column and tool calls that the chat template does not render (it ignores them, so "
            "training would silently cut them out)") in out
    assert "data.template: tokenizer" in out


def test_shipped_tool_data_is_the_generators_and_previews_as_the_readme_shows(in_root, no_model):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", in_root / "scripts" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    shipped = [json.loads(line) for line in (in_root / "data/quickstart/tools_train.jsonl").read_text().splitlines()]
    assert make_data.make_tools(make_data.build_world()) == shipped
    result = CliRunner().invoke(app, [  # the README's command, without the on-disk cache
        "data", "preview", "recipes/quickstart.yaml", "--set", "data.train[0].path=data/quickstart/tools_train.jsonl",
        "--set", "data.template=tests/templates/qwen3_tools.jinja", "--set", "data.max_length=1024",
        "--set", "data.cache_dir=null", "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert ("<|im_start|>assistant\n«<think>\nThe registry has the instrument of Druna Graixquist.\n</think>\n\n"
            "<tool_call>\n{\"name\": \"lookup\", \"arguments\": {\"name\": \"Druna Graixquist\", \"attribute\": "
            "\"instrument\"}}\n</tool_call><|im_end|>»\n<|im_start|>user\n<tool_response>\n{\"name\": \"Druna "
            "Graixquist\", \"instrument\": \"drum\"}\n</tool_response><|im_end|>\n") in out
    assert "32 tool calls (trained: they are the assistant's), 32 tool results (masked)" in out
    assert "16 assistant turns carry it; 16 rendered by the chat template; 16 trained, 0 masked" in out
    assert "18,530 tokens, 18.4% trained" in out and "FAIL" not in out


def test_preview_says_results_are_trained_with_train_on_all(tmp_path, tiny_model, no_model):
    result = preview(tmp_path, build_tool_model(tiny_model, tmp_path / "qwen3", "qwen3"), extra=", train_on: all")
    assert result.exit_code == 0, result.output
    assert ("tool use: 1 tool calls, 1 tool results, 3 assistant turns with reasoning: all trained, as every token "
            "(data.train_on: all; `assistant` masks the results)") in result.output
    assert "«<|im_start|>system\n# Tools" in result.output and "(masked)" not in result.output


def test_preview_of_reasoning_without_tools(tmp_path, tiny_model, no_model):
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "<think>Add them.</think>4"}]}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {{name_or_path: {build_tool_model(tiny_model, tmp_path / 'q', 'qwen3')}}}\n"
                      f"data: {{train: [{{path: {data}}}], cache_dir: null}}\n")
    result = CliRunner().invoke(app, ["data", "preview", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "«<think>\nAdd them.\n</think>\n\n4<|im_end|>»" in result.output
    assert "reasoning: 1 assistant turns carry it; 1 rendered by the chat template; 1 trained" in result.output
    assert "tool use:" not in result.output
