"""The tool-calling recipe (recipes/llama-3/8b-qlora-sft-tools.yaml, issue 15 item 2): the rows of the Hub dataset it
names (Glaive function-calling v2 in ShareGPT form) are understood, and its data section, pointed at such rows in a
local file, trains the calls and answers and never the tool results on a Llama-3.1-style template (the tests' stand-in
for the model's own, `tests/tinytools.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from tinytools import tool_tokenizer

from finetune.data.build import prepare
from finetune.data.encode import IGNORE
from finetune.data.formats import normalize_sft, resolve_format
from finetune.data.readers import Table
from finetune.data.templates import apply_template
from finetune.recipe.schema import load_recipe

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "llama-3" / "8b-qlora-sft-tools.yaml"
SCHEMA = {"name": "calculate_area", "description": "Area of a shape",
          "parameters": {"type": "object", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}}
# The shape of hiyouga/glaive-function-calling-v2-sharegpt rows: the call as JSON text, the tools as JSON text of bare
# schemas ("[]" when the conversation has none).
GLAIVE = {"conversations": [{"from": "human", "value": "Area of a unit square?"},
                            {"from": "function_call",
                             "value": "{\"name\": \"calculate_area\", \"arguments\": {\"shape\": \"square\"}}"},
                            {"from": "observation", "value": "{\"area\": 1}"},
                            {"from": "gpt", "value": "It is 1."}],
          "tools": json.dumps([SCHEMA])}
CHAT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": "[]"}


def test_glaive_rows_become_tool_calls_results_and_schemas():
    table = Table("data.train[0]", "hiyouga/glaive-function-calling-v2-sharegpt", [GLAIVE, CHAT],
                  [("hub", "row 1"), ("hub", "row 2")])
    assert resolve_format(table, "auto")[0] == "sharegpt"
    tool_row, chat_row = normalize_sft(table, "sharegpt")
    assert tool_row["messages"] == [
        {"role": "user", "content": "Area of a unit square?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculate_area", "arguments": "{\"shape\": \"square\"}"}}]},
        {"role": "tool", "content": "{\"area\": 1}"},
        {"role": "assistant", "content": "It is 1."}]
    assert json.loads(tool_row["tools"]) == [{"type": "function", "function": SCHEMA}]
    assert chat_row == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def trained_pieces(tokenizer, ids, labels):
    """The decoded runs of trained tokens."""
    pieces, run = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            run.append(i)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


def test_the_recipe_trains_calls_and_answers_never_results(tok, write):
    rows = write("glaive.jsonl", [GLAIVE, CHAT, CHAT])
    recipe = load_recipe(RECIPE, [f"data.train[0].path={rows}", "data.cache_dir=null", "data.shuffle=false"])
    data = recipe.data
    assert data.template == "tokenizer" and data.train_on == "assistant" and data.train_on_reasoning
    tokenizer = tool_tokenizer(tok, "llama31")
    apply_template(tokenizer, data)
    prepared = prepare(data, tokenizer, "sft", 0)
    assert len(prepared.dataset) == 2  # the last of the 3 rows is held out (eval_fraction)
    tool_sample, chat_sample = ([prepared.dataset[i]["input_ids"], prepared.dataset[i]["labels"]] for i in (0, 1))
    assert trained_pieces(tokenizer, *tool_sample) == [
        "{\"name\": \"calculate_area\", \"parameters\": {\"shape\": \"square\"}}<|eot_id|>", "It is 1.<|eot_id|>"]
    text = tokenizer.decode(tool_sample[0])
    assert "{\"area\": 1}" in text and "calculate_area" in text.split("<|eot_id|>")[0]  # result and tools rendered
    assert trained_pieces(tokenizer, *chat_sample) == ["Hello!<|eot_id|>"]
    assert "Functions:" not in tokenizer.decode(chat_sample[0])  # "[]": no tools block
    assert prepared.report.stats["tool_calls"] == 1 and prepared.report.stats["tool_results"] == 1
