"""End to end (issue 15, item 2): `ft train` runs QLoRA SFT on tool-use conversations (a `tools` column, assistant
calls, tool results, reasoning) with a tool-rendering chat template on the tiny model; the loss falls, the data
report counts the calls and results, and the trained tokens are the calls and answers only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app

# A compact tool template (ChatML turns, the tool names in a system turn, calls in <tool_call> tags, results in a
# `tool` turn), short enough for the tiny model's 256 positions.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
    "{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}}}}


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]}
        if i % 2:
            call["reasoning_content"] = "use add"
        out.append({"messages": [{"role": "user", "content": f"add {a} {b}"}, call,
                                 {"role": "tool", "content": str(a + b)},
                                 {"role": "assistant", "content": str(a + b)}], "tools": [ADD]})
    return out


@pytest.fixture(scope="module")
def tools_run(tiny_model, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tools")
    for name, n, seed in (("train", 128, 0), ("eval", 16, 1)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)), encoding="utf-8")
    (out / "tools.jinja").write_text(TEMPLATE, encoding="utf-8")
    recipe = out / "recipe.yaml"
    recipe.write_text(f"""
name: tools-e2e
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: float32}}
lora: {{r: 8, alpha: 16, target_modules: all-linear}}
data:
  train: [{{path: {out / 'train.jsonl'}}}]
  eval: [{{path: {out / 'eval.jsonl'}}}]
  template: {out / 'tools.jinja'}
  max_length: 160
  cache_dir: null
training: {{max_steps: 24, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 2, seed: 1}}
output: {{dir: {out / 'run'}}}
""")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return out / "run", result.output


def test_tool_sft_trains_and_loss_falls(tools_run):
    run, output = tools_run
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 5 and sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.5, losses


def test_preview_of_the_same_data_marks_calls_and_answers_only(tools_run, tiny_model):
    run, _ = tools_run
    result = CliRunner().invoke(app, ["data", "preview", str(run / "recipe.yaml"), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tool use: 128 tool calls (trained: they are the assistant's), 128 tool results (masked)" in out
    assert "reasoning: 64 assistant turns carry it; 64 rendered by the chat template; 64 trained, 0 masked" in out
    sample = out.split("--- sample 1 of 128")[1].split("\n", 1)[1].split("\n\n")[0]
    trained = [piece.split("»")[0] for piece in sample.split("«")[1:]]
    a, b = sample.split("user\nadd ")[1].split("<|im_end|>")[0].split()
    args = json.dumps({"a": int(a), "b": int(b)})
    assert trained[0].endswith(f"<tool_call>add{args}</tool_call><|im_end|>")
    assert trained[1] == f"{int(a) + int(b)}<|im_end|>"
    assert f"<|im_start|>tool\n{int(a) + int(b)}<|im_end|>" in sample and len(trained) == 2  # the result: masked
