"""Tool calls, tool results and reasoning (issue 15, item 2): label masks against hand-written expectations, on the
tests' Qwen3-style and Llama-3.1-style templates (`tests/tinytools.py`) over the character-level tokenizer.

Expected samples are written out as the rendered text with «...» around the trained part; every character is one
token except the template's added tokens, so the ids and labels are spelled out by the string itself.
"""

from __future__ import annotations

import json
import re

import pytest
from tinytools import LLAMA31_TOKENS, QWEN3_TOKENS, tool_tokenizer

from finetune.data.build import prepare
from finetune.data.templates import apply_template
from finetune.errors import FinetuneError

S, E = "<|im_start|>", "<|im_end|>"
H0, H1, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
QWEN_TOOLS = (f"{S}system\n# Tools\n\nYou may call functions; their signatures are in <tools></tools>:\n<tools>\n"
              f"{json.dumps(WEATHER)}\n</tools>\n\nWrite each call as a JSON object with its name and arguments "
              f"between <tool_call></tool_call> tags.{E}\n")
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]}
RESULT = {"role": "tool", "content": "-3C"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


@pytest.fixture
def qwen3(tok):
    return tool_tokenizer(tok, "qwen3")


@pytest.fixture
def llama31(tok):
    return tool_tokenizer(tok, "llama31")


def parse(tokenizer, marked: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of a text with «...» around the trained part: the tokenizer's added tokens by name (the others
    of the two styles are plain characters there), other characters one id each
    from the character table (5 + code point - 32; newline 100), as tests/tinymodels.py builds the vocabulary."""
    added = sorted(t for t in [*QWEN3_TOKENS, *LLAMA31_TOKENS, S, E] if t in tokenizer.get_added_vocab())
    added.sort(key=len, reverse=True)
    pattern = re.compile("|".join(["«", "»", *map(re.escape, added)]) + "|.", re.S)
    ids, labels, trained = [], [], False
    for t in pattern.findall(marked):
        if t in "«»":
            trained = t == "«"
            continue
        tid = tokenizer.convert_tokens_to_ids(t) if len(t) > 1 else 100 if t == "\n" else 5 + ord(t) - 32
        ids.append(tid)
        labels.append(tid if trained else -100)
    return ids, labels


def encoded(cfg, tokenizer, rows, write, **data):
    section = cfg(write("d.jsonl", rows), **data)
    apply_template(tokenizer, section)
    prepared = prepare(section, tokenizer, "sft", 0)
    return prepared, [(row["input_ids"], row["labels"]) for row in prepared.dataset]


def test_qwen3_tool_call_and_answer_trained_tool_result_masked(cfg, qwen3, write):
    row = {"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.")], "tools": [WEATHER]}
    prepared, [sample] = encoded(cfg, qwen3, [row], write)
    assert sample == parse(qwen3, (
        f"{QWEN_TOOLS}{S}user\nOslo?{E}\n"
        f"{S}assistant\n«<tool_call>\n{{\"name\": \"weather\", \"arguments\": {{\"city\": \"Oslo\"}}}}\n"
        f"</tool_call>{E}»\n{S}user\n<tool_response>\n-3C\n</tool_response>{E}\n"
        f"{S}assistant\n«<think>\n\n</think>\n\nCold.{E}»\n"))  # the last turn's (empty) think block, as Qwen3
    stats = prepared.report.stats
    assert stats["tool_calls"] == 1 and stats["tool_results"] == 1 and stats["reasoning_turns"] == 0


def test_qwen3_parallel_calls_trained_grouped_results_masked(cfg, qwen3, write):
    # Two calls in one turn (with ids), two results answering them (one user turn in Qwen3's rendering), then a new
    # user question answered directly: only the calls and the answers carry labels.
    calls = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
        {"id": "b", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]}
    row = {"messages": [user("Oslo, Rome?"), calls, {"role": "tool", "tool_call_id": "a", "content": "-3C"},
                        {"role": "tool", "tool_call_id": "b", "content": {"c": 18}}, assistant("Mixed."),
                        user("Thanks"), assistant("Bye.")], "tools": [WEATHER]}
    prepared, [sample] = encoded(cfg, qwen3, [row], write)
    call = "<tool_call>\n{{\"name\": \"weather\", \"arguments\": {{\"city\": \"{}\"}}}}\n</tool_call>"
    assert sample == parse(qwen3, (
        f"{QWEN_TOOLS}{S}user\nOslo, Rome?{E}\n"
        f"{S}assistant\n«Checking.\n{call.format('Oslo')}\n{call.format('Rome')}{E}»\n"
        f"{S}user\n<tool_response>\n-3C\n</tool_response>\n<tool_response>\n{{\"c\": 18}}\n</tool_response>{E}\n"
        f"{S}assistant\n«Mixed.{E}»\n{S}user\nThanks{E}\n"
        f"{S}assistant\n«<think>\n\n</think>\n\nBye.{E}»\n"))
    assert prepared.report.stats["tool_calls"] == 2 and prepared.report.stats["tool_results"] == 2


def test_qwen3_drops_past_reasoning_as_the_template_does(cfg, qwen3, write):
    row = {"messages": [user("a"), assistant("B", reasoning_content="r1"), user("c"),
                        assistant("D", reasoning_content="r2")]}
    prepared, [sample] = encoded(cfg, qwen3, [row], write)
    assert sample == parse(qwen3, f"{S}user\na{E}\n{S}assistant\n«B{E}»\n{S}user\nc{E}\n"
                                  f"{S}assistant\n«<think>\nr2\n</think>\n\nD{E}»\n")
    assert prepared.report.stats == {"tool_calls": 0, "tool_results": 0, "reasoning_turns": 2,
                                     "reasoning_rendered": 1, "reasoning_trained": 1}


def test_qwen3_agent_loop_then_a_new_question_drops_the_loops_reasoning(cfg, qwen3, write):
    # The reasoning of the tool-calling turns is dropped once a later user message follows (as Qwen3 renders it);
    # a prefix ending at the tool result would render it, so it is left out of every rendering of the row.
    row = {"messages": [user("Oslo?"), {**CALL, "reasoning_content": "Need data."}, RESULT,
                        assistant("Cold.", reasoning_content="Below zero."), user("Rome?"),
                        assistant("Warm.", reasoning_content="Mild.")], "tools": [WEATHER]}
    prepared, [sample] = encoded(cfg, qwen3, [row], write)
    assert sample == parse(qwen3, (
        f"{QWEN_TOOLS}{S}user\nOslo?{E}\n"
        f"{S}assistant\n«<tool_call>\n{{\"name\": \"weather\", \"arguments\": {{\"city\": \"Oslo\"}}}}\n"
        f"</tool_call>{E}»\n{S}user\n<tool_response>\n-3C\n</tool_response>{E}\n"
        f"{S}assistant\n«Cold.{E}»\n{S}user\nRome?{E}\n"
        f"{S}assistant\n«<think>\nMild.\n</think>\n\nWarm.{E}»\n"))
    assert prepared.report.stats["reasoning_turns"] == 3 and prepared.report.stats["reasoning_rendered"] == 1


def test_reasoning_masked_with_train_on_reasoning_false(cfg, qwen3, write):
    # An agent loop after one user message: both turns keep their reasoning; neither trains it.
    row = {"messages": [user("Oslo?"), {**CALL, "reasoning_content": "Need data."}, RESULT,
                        assistant("Cold.", reasoning_content="It is below zero.")], "tools": [WEATHER]}
    prepared, [sample] = encoded(cfg, qwen3, [row], write, train_on_reasoning=False)
    assert sample == parse(qwen3, (
        f"{QWEN_TOOLS}{S}user\nOslo?{E}\n"
        f"{S}assistant\n<think>\nNeed data.\n</think>\n\n"
        f"«<tool_call>\n{{\"name\": \"weather\", \"arguments\": {{\"city\": \"Oslo\"}}}}\n</tool_call>{E}»\n"
        f"{S}user\n<tool_response>\n-3C\n</tool_response>{E}\n"
        f"{S}assistant\n<think>\nIt is below zero.\n</think>\n\n«Cold.{E}»\n"))
    assert prepared.report.stats["reasoning_rendered"] == 2 and prepared.report.stats["reasoning_trained"] == 0


def test_think_tags_and_thinking_field_are_the_same_reasoning(cfg, qwen3, write):
    expected = parse(qwen3, f"{S}user\nq{E}\n{S}assistant\n«<think>\nstep\n</think>\n\nA{E}»\n")
    for message in (assistant("<think>\nstep\n</think>\n\nA"), assistant("A", thinking="step"),
                    assistant("A", reasoning_content="  step\n")):
        _, [sample] = encoded(cfg, qwen3, [{"messages": [user("q"), message]}], write)
        assert sample == expected, message


def test_llama31_tool_call_and_inline_reasoning(cfg, llama31, write):
    tools = "\n\n".join(["To call a function, answer with JSON {\"name\": function name, \"parameters\": its "
                         "arguments}. Functions:", json.dumps(WEATHER, indent=4)])
    head = f"<|begin_of_text|>{H0}system{H1}\n\nEnvironment: ipython\n\n{tools}{EOT}"
    row = {"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.", reasoning_content="Below zero.")],
           "tools": json.dumps([WEATHER["function"]])}  # a bare schema, as JSON text: wrapped as the others
    prepared, [sample] = encoded(cfg, llama31, [row], write)
    assert sample == parse(llama31, (
        f"{head}{H0}user{H1}\n\nOslo?{EOT}"
        f"{H0}assistant{H1}\n\n«{{\"name\": \"weather\", \"parameters\": {{\"city\": \"Oslo\"}}}}{EOT}»"
        f"{H0}ipython{H1}\n\n-3C{EOT}"
        f"{H0}assistant{H1}\n\n«<think>\nBelow zero.\n</think>\n\nCold.{EOT}»"))  # no reasoning field: inline
    _, [masked] = encoded(cfg, llama31, [row], write, train_on_reasoning=False)
    assert masked[0] == sample[0]
    assert masked == parse(llama31, (
        f"{head}{H0}user{H1}\n\nOslo?{EOT}"
        f"{H0}assistant{H1}\n\n«{{\"name\": \"weather\", \"parameters\": {{\"city\": \"Oslo\"}}}}{EOT}»"
        f"{H0}ipython{H1}\n\n-3C{EOT}"
        f"{H0}assistant{H1}\n\n<think>\nBelow zero.\n</think>\n\n«Cold.{EOT}»"))


def test_sharegpt_function_call_and_observation_map_to_tool_messages(cfg, qwen3, write):
    messages = {"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.")], "tools": [WEATHER]}
    sharegpt = {"conversations": [{"from": "human", "value": "Oslo?"},
                                  {"from": "function_call", "value": "{\"name\": \"weather\", \"arguments\": "
                                                                     "{\"city\": \"Oslo\"}}"},
                                  {"from": "observation", "value": "-3C"}, {"from": "gpt", "value": "Cold."}],
                "tools": json.dumps([WEATHER])}
    assert encoded(cfg, qwen3, [sharegpt], write)[1] == encoded(cfg, qwen3, [messages], write)[1]


def test_openai_legacy_function_call_field_is_a_tool_call(cfg, qwen3, write):
    messages = {"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.")], "tools": [WEATHER]}
    legacy = {"messages": [user("Oslo?"), {"role": "assistant", "content": None, "function_call": {
        "name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}, {"role": "function", "name": "weather",
                                                                      "content": "-3C"}, assistant("Cold.")],
              "tools": [WEATHER]}
    assert encoded(cfg, qwen3, [legacy], write)[1] == encoded(cfg, qwen3, [messages], write)[1]


def test_template_that_ignores_tool_calls_is_refused_naming_rows(cfg, tok, write):
    rows = [{"messages": [user("hi"), assistant("hello")]},
            {"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.")], "tools": [WEATHER]}]
    with pytest.raises(FinetuneError) as e:
        encoded(cfg, tok, rows, write)  # the tiny ChatML template renders content only
    msg = str(e.value)
    assert "d.jsonl" in msg and "1 row: the tools column and tool calls that the chat template does not render" in msg
    assert "(line 2)" in msg


def test_template_refusal_names_the_row(cfg, llama31, write):
    two = {**CALL, "tool_calls": CALL["tool_calls"] * 2}
    with pytest.raises(FinetuneError, match=r"refused by the chat template \(This template takes one tool call per "
                                            r"assistant message.\) \(line 1\)"):
        encoded(cfg, llama31, [{"messages": [user("Oslo?"), two, RESULT, RESULT, assistant("Cold.")]}], write)


def test_train_on_reasoning_false_needs_train_on_assistant(cfg):
    with pytest.raises(ValueError, match="train_on_reasoning: false masks the reasoning"):
        cfg("d.jsonl", train_on="all", train_on_reasoning=False)


def test_probe_passes_templates_that_demand_mistral_style_call_ids(cfg, tok, write):
    # Mistral's templates raise unless every call id is 9 alphanumeric characters; the probe's call has such an id,
    # so the calls are found rendered, and rows whose ids do not fit are refused with the template's own message.
    tok.chat_template = (
        "{% for m in messages %}{% if m.tool_calls %}assistant: {% for c in m.tool_calls %}"
        "{% if c.id is not defined or c.id|length != 9 %}{{ raise_exception('Tool call ids need 9 characters') }}"
        "{% endif %}[CALL]{{ c.function.name }} {{ c.function.arguments|tojson }}{% endfor %}<|im_end|>"
        "{% elif m.role == 'tool' %}[RESULT]{{ m.content }}{% else %}{{ m.role }}: {{ m.content }}<|im_end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    from finetune.data.probe import support

    found = support(tok)
    assert found.tool_calls and found.tool_results and not found.tools
    ok = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "id": "abcdefghi"}]}
    _, [sample] = encoded(cfg, tok, [{"messages": [user("Oslo?"), ok, RESULT, assistant("Cold.")]}], write)
    assert tok.decode([i for i, label in zip(*sample, strict=True) if label != -100]) == (
        "[CALL]weather {\"city\": \"Oslo\"}<|im_end|>Cold.<|im_end|>")
    with pytest.raises(FinetuneError, match=r"refused by the chat template \(Tool call ids need 9 characters\)"):
        encoded(cfg, tok, [{"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.")]}], write)


@pytest.mark.parametrize("style", ["qwen3", "llama31"])
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_batched_encoding_equals_row_by_row(cfg, tok, write, style, train_on_reasoning):
    # The Arrow path tokenizes a batch of rows in one call (encode_many); tool use and reasoning must come out as the
    # per-row encoding gives them: ids, labels and counts, and the same error for a row the template refuses.
    from finetune.data import formats
    from finetune.data.encode import EncodeError, encode_example
    from finetune.data.encode_many import encode_many
    from finetune.data.readers import Table

    tokenizer = tool_tokenizer(tok, style)
    rows = [{"messages": [user("Oslo?"), CALL, RESULT, assistant("Cold.", reasoning_content="Below zero.")],
             "tools": [WEATHER]},
            {"messages": [user("a"), assistant("B", reasoning_content="r1"), user("c"),
                          assistant("<think>x</think>D")]},
            {"messages": [user("hi"), assistant("Hello.")]},
            {"text": "plain text row"}]
    section = cfg(write("d.jsonl", rows[:3]), train_on_reasoning=train_on_reasoning)
    template = apply_template(tokenizer, section)
    chats = rows[:3]
    examples = [*formats.normalize_sft(Table("k", "d.jsonl", chats, [("d.jsonl", "")] * 3), "messages"), rows[3]]
    batched = encode_many(tokenizer, examples, section, template)
    for ex, got in zip(examples, batched, strict=True):
        try:
            want = encode_example(tokenizer, ex, section, template)
        except EncodeError as e:
            assert isinstance(got, EncodeError) and str(got) == str(e)
            continue
        assert (got.input_ids, got.labels, got.stats) == (want.input_ids, want.labels, want.stats)
    assert sum(not isinstance(b, EncodeError) and b.stats.get("tool_calls", 0) for b in batched) == 1
