"""What a chat template does with tools, tool calls, tool results and reasoning, found by rendering small probe
conversations with and without each of them and comparing (once per template).

A template that ignores `tools` or `tool_calls` would train the model on conversations with the calls silently cut
out; `encode` refuses such rows, and `ft data preview` prints what the probe found. Reasoning goes in the field the
template reads (`reasoning_content`, as Qwen3's, or `thinking`); a template that reads neither gets it written inline
as `<think>...</think>` in front of the answer, the convention of reasoning models whose templates keep it in the
content. Templates that keep reasoning only on the turns after the last user message (as Qwen3's) are detected, so
the preview can say that earlier turns train without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.data.templates import render

INLINE_OPEN, INLINE_CLOSE = "<think>\n", "\n</think>\n\n"
_FN, _ARG, _RESULT, _R1, _R2, _ANSWER = "probe_fn_q7", "probe_arg_q7", "probe_result_q7", "probe_r1_q7", \
    "probe_r2_q7", "probe_answer_q7"
_TOOL = {"type": "function", "function": {"name": _FN, "description": "probe",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
# The call id has 9 alphanumeric characters: Mistral's templates refuse any other.
_CALL = {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "id": "q7probe01", "function": {"name": _FN, "arguments": {"x": _ARG}}}]}
_USER = {"role": "user", "content": "Hi"}


@dataclass(frozen=True)
class Support:
    """What the template renders."""

    tools: bool  # the `tools` schemas
    tool_calls: bool  # assistant tool calls, name and arguments
    tool_results: bool  # `tool` messages
    reasoning_field: str | None  # the message field it renders reasoning from; None: none (written inline)
    reasoning_open: str | None  # what it writes between the turn's start and the reasoning (None: not found)
    reasoning_close: str  # what it writes between the reasoning and the answer
    drops_past_reasoning: bool  # reasoning kept only on turns after the last user message

    def lines(self) -> list[str]:
        """What the probe found, for the preview."""
        said = {True: "rendered", False: "IGNORED by the template"}
        reasoning = (f"from the '{self.reasoning_field}' field" if self.reasoning_field else
                     "not read by the template: written inline as <think>...</think> before the answer")
        if self.drops_past_reasoning:
            reasoning += ("; kept only on assistant turns after the last user message (earlier turns train without "
                          "it, as the template renders them)")
        return [f"tools column: {said[self.tools]}; tool calls: {said[self.tool_calls]}; tool results: "
                f"{said[self.tool_results]}", f"reasoning: {reasoning}"]


_CACHE: dict[tuple[str, str, str], Support] = {}


def _try(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False,
         tools: list[dict[str, Any]] | None = None) -> str:
    try:
        return render(tokenizer, messages, generation_prompt, tools)
    except Exception:  # a template may refuse a role or field outright: that is "not supported"
        return ""


def support(tokenizer: Any) -> Support:
    """What the tokenizer's chat template renders of tools, calls, results and reasoning (cached per template)."""
    key = (tokenizer.chat_template or "", str(tokenizer.bos_token), str(tokenizer.eos_token))
    if key in _CACHE:
        return _CACHE[key]
    with_tools = _try(tokenizer, [_USER], True, [_TOOL])
    tools = _FN in with_tools and with_tools != _try(tokenizer, [_USER], True)
    called = _try(tokenizer, [_USER, _CALL])
    results = _try(tokenizer, [_USER, _CALL, {"role": "tool", "content": _RESULT, "tool_call_id": "q7probe01",
                                               "name": _FN}])
    field, opening, close, drops = None, INLINE_OPEN, INLINE_CLOSE, False
    head = _try(tokenizer, [_USER], True)
    for name in ("reasoning_content", "thinking"):
        text = _try(tokenizer, [_USER, {"role": "assistant", "content": _ANSWER, name: _R1}])
        if _R1 in text and _ANSWER in text[text.index(_R1):]:
            field = name
            close = text[text.index(_R1) + len(_R1): text.index(_ANSWER, text.index(_R1))]
            opening = text[len(head): text.index(_R1)] if head and text.startswith(head) else None
            two = _try(tokenizer, [_USER, {"role": "assistant", "content": "a", name: _R1},
                                   {"role": "user", "content": "Go on"}, {"role": "assistant", "content": "b",
                                                                          name: _R2}])
            drops = _R2 in two and _R1 not in two
            break
    found = Support(tools=tools, tool_calls=_FN in called and _ARG in called, tool_results=_RESULT in results,
                    reasoning_field=field, reasoning_open=opening, reasoning_close=close, drops_past_reasoning=drops)
    _CACHE[key] = found
    return found


def for_support(messages: list[dict[str, Any]], found: Support) -> list[dict[str, Any]]:
    """The messages with reasoning where the template reads it: its field, or inline before the answer."""
    out = []
    for m in messages:
        reasoning = m.get("reasoning_content")
        if reasoning and found.reasoning_field != "reasoning_content":
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            if found.reasoning_field:
                m[found.reasoning_field] = reasoning
            else:
                m["content"] = f"{INLINE_OPEN}{reasoning}{INLINE_CLOSE}{m['content']}"
        out.append(m)
    return out


def without_dropped_reasoning(messages: list[dict[str, Any]], found: Support) -> list[dict[str, Any]]:
    """The messages with the reasoning that a template dropping past reasoning leaves out of the whole conversation
    (that of assistant turns before the last user message) already removed, so that conversations cut short before
    a later turn render those turns as the whole conversation does (`encode` finds each turn from such prefixes)."""
    field = found.reasoning_field
    if not (found.drops_past_reasoning and field):
        return messages
    last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [{k: v for k, v in m.items() if k != field} if i < last_user and m["role"] == "assistant" else m
            for i, m in enumerate(messages)]
