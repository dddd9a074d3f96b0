"""Bad tool-use and reasoning rows (issue 15, item 3): `ft validate` and `ft train` refuse them before any tokenizer
or model loads, naming the file, the row's line, the message in it and what to do."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from finetune.cli import app

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": 1}"}}
GOOD = {"messages": [{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
                     {"role": "assistant", "content": "Cold."}], "tools": [WEATHER]}


def with_call(arguments):
    call = {"type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {**GOOD, "messages": [GOOD["messages"][0], {**GOOD["messages"][1], "tool_calls": [call]},
                                 *GOOD["messages"][2:]]}


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


CASES = {
    "invalid JSON arguments": (
        with_call("{city: Oslo}"),
        "1 row: tool call arguments that are not valid JSON (write them as a JSON object) (line 2: message 2 "
        "(assistant), call 1 'weather': Expecting property name enclosed in double quotes at character 1)"),
    "arguments not an object": (
        with_call("[\"Oslo\"]"),
        "tool call arguments that are not a JSON object (arguments map parameter names to values) (line 2: "
        "message 2 (assistant), call 1 'weather': a list)"),
    "result with no call": (
        {"messages": [user("Oslo?"), {"role": "tool", "content": "-3C"}, {"role": "assistant", "content": "Cold."}]},
        "1 row: a tool result with no tool call before it (each tool message answers a call of the assistant message "
        "before it: add the call, or drop the result) (line 2: message 2 (tool))"),
    "call written as text (Hermes style)": (
        {"messages": [user("Oslo?"), {"role": "assistant", "content": "<tool_call>\n{\"name\": \"weather\"}\n"
                                                                     "</tool_call>"},
                      {"role": "tool", "content": "-3C"}, {"role": "assistant", "content": "Cold."}]},
        "(line 2: message 3 (tool): the assistant message before it writes the call as <tool_call> text; give it as "
        "tool_calls (name, arguments) so the chat template renders it)"),
    "more results than calls": (
        {**GOOD, "messages": [*GOOD["messages"][:3], {"role": "tool", "content": "-4C"}, GOOD["messages"][3]]},
        "a tool result with no tool call before it (each tool message answers a call of the assistant message "
        "before it: add the call, or drop the result) (line 2: message 4 (tool): 1 call(s), more results)"),
    "result for another call id": (
        {**GOOD, "messages": [*GOOD["messages"][:2], {"role": "tool", "tool_call_id": "c9", "content": "-3C"},
                              GOOD["messages"][3]]},
        "a tool result whose tool_call_id matches no call before it (line 2: message 3 (tool): 'c9' (calls: c1))"),
    "tools an object": (
        {**GOOD, "tools": {"weather": "the weather"}},
        "1 row: a 'tools' column that is not a list of JSON schemas (each one {\"type\": \"function\", \"function\": "
        "{\"name\": ..., \"parameters\": {...}}}) (line 2: a dict)"),
    "tools a list of names": (
        {**GOOD, "tools": ["weather"]},
        "a 'tools' column that is not a list of JSON schemas (each one {\"type\": \"function\", \"function\": "
        "{\"name\": ..., \"parameters\": {...}}}) (line 2: tool 1: a str)"),
    "tools schema without a name": (
        {**GOOD, "tools": [{"type": "function", "function": {"parameters": {}}}]},
        "(line 2: tool 1: no function name)"),
    "tools text not JSON": (
        {**GOOD, "tools": "[{name: weather}]"},
        "1 row: a 'tools' column that is not valid JSON (write it as a JSON list of schemas) (line 2: Expecting "
        "property name enclosed in double quotes"),
    "reasoning on a user turn": (
        {"messages": [user("Oslo?", reasoning_content="hmm"), {"role": "assistant", "content": "Cold."}]},
        "1 row: reasoning on a turn that is not the assistant's (only the model reasons; move it to the assistant "
        "message or drop the field) (line 2: message 1 (user) has 'reasoning_content')"),
    "thinking on a tool result": (
        {**GOOD, "messages": [*GOOD["messages"][:2], {**GOOD["messages"][2], "thinking": "x"}, GOOD["messages"][3]]},
        "reasoning on a turn that is not the assistant's (only the model reasons; move it to the assistant message "
        "or drop the field) (line 2: message 3 (tool) has 'thinking')"),
    "unclosed think tag": (
        {"messages": [user("q"), {"role": "assistant", "content": "<think>step, and no end"}]},
        "an assistant message that opens <think> and never closes it (line 2: message 2 (assistant))"),
    "tool calls on a user turn": (
        {"messages": [user("q", tool_calls=GOOD["messages"][1]["tool_calls"]), {"role": "assistant", "content": "a"}]},
        "tool calls on a turn that is not the assistant's (only the model calls tools; move them to the assistant "
        "message) (line 2: message 1 (user))"),
    "sharegpt function_call not JSON": (
        {"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "function_call", "value": "weather(Oslo)"},
                           {"from": "observation", "value": "-3C"}, {"from": "gpt", "value": "Cold."}]},
        "1 row: a function_call turn that is not valid JSON (its value is the call: {\"name\": ..., \"arguments\": "
        "{...}}) (line 2: message 2 (function_call): Expecting value at character 0)"),
}


def recipe(tmp_path, bad):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (model / "model.safetensors").write_bytes(b"")
    first = GOOD if "messages" in bad else {"conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\n")
    return path, data


def test_the_good_row_passes(tmp_path):
    path, _ = recipe(tmp_path, GOOD)
    out = CliRunner().invoke(app, ["validate", str(path), "-q"])
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize("case", CASES)
def test_bad_tool_and_reasoning_rows_are_refused_by_validate(tmp_path, case):
    bad, expected = CASES[case]
    path, data = recipe(tmp_path, bad)
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    assert f"data.train[0] '{data}':" in out.output and expected in out.output, out.output


def test_train_refuses_them_before_anything_loads(tmp_path):
    path, data = recipe(tmp_path, CASES["invalid JSON arguments"][0])
    out = CliRunner().invoke(app, ["train", str(path)])  # the model folder holds no real weights: never reached
    assert out.exit_code == 2 and str(data) in out.output and "not valid JSON" in out.output, out.output
    assert "Traceback" not in out.output
