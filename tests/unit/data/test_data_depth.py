"""Deeply nested tool-call arguments, results and schemas (issue 33, item 11): `ft validate` names the file, line and
the depth cap instead of crashing with RecursionError; the cap is `finetune.data.messages.MAX_DEPTH`."""

from __future__ import annotations

import json

import pytest
from test_data_tool_errors import GOOD, recipe, with_call
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.messages import MAX_DEPTH, nested_deeper


def nested(levels: int) -> dict:
    """An object `levels` objects deep: {"a": {"a": ... {"a": 1}}}."""
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[return-value]


def test_nesting_is_measured_without_recursion():
    assert not nested_deeper(nested(MAX_DEPTH)) and nested_deeper(nested(MAX_DEPTH + 1))
    assert nested_deeper([[[]]], limit=2) and not nested_deeper([[]], limit=2) and not nested_deeper("x", limit=0)
    assert nested_deeper(nested(100_000))  # far past Python's recursion limit


def _validate(tmp_path, row) -> str:
    path, data = recipe(tmp_path, row)
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output and "RecursionError" not in out.output, out.output
    return out.output.replace("\n", " ")


CAP = f"JSON nested deeper than {MAX_DEPTH} levels (the cap for tool calls, results and schemas; flatten it)"


@pytest.mark.parametrize(("what", "row", "expected"), [
    ("arguments as text, 5000 deep", with_call(json.dumps(nested(1)).replace('{"a": 1}', "{\"a\": " * 5000 + "1"
                                                                                  + "}" * 5000)),
     f"tool call arguments in {CAP} (line 2: message 2 (assistant), call 1 'weather')"),
    ("arguments as an object, one level over the cap", with_call(nested(MAX_DEPTH + 1)),
     f"tool call arguments in {CAP} (line 2: message 2 (assistant), call 1 'weather')"),
    ("a tool result", {**GOOD, "messages": [*GOOD["messages"][:2], {**GOOD["messages"][2], "content": nested(200)},
                                            GOOD["messages"][3]]},
     f"a tool result in {CAP} (line 2: message 3 (tool))"),
    ("tools schemas", {**GOOD, "tools": [{"type": "function", "function": {"name": "weather",
                                                                           "parameters": nested(200)}}]},
     f"a 'tools' column in {CAP} (line 2"),
])
def test_deep_rows_are_refused_naming_line_and_cap(tmp_path, what, row, expected):
    assert expected in _validate(tmp_path, row)


def test_a_line_too_deep_for_the_json_parser_names_file_and_line(tmp_path):
    path, data = recipe(tmp_path, GOOD)
    deep = json.dumps(with_call("ARGS")).replace('"ARGS"', "{\"a\": " * 5000 + "1" + "}" * 5000)
    data.write_text(json.dumps(GOOD) + "\n" + deep + "\n", encoding="utf-8")
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert f"data.train[0]: {data} line 2 nests JSON objects and lists too deeply" in out.output.replace("\n", " ")
