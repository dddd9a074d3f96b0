"""One message of a conversation, and a row's `tools` column, in the one shape every later step reads.

A normalised message is `{"role", "content"}` plus, where the row has them: `tool_calls` on an assistant message
(OpenAI's shape, `[{"type": "function", "function": {"name", "arguments"}, "id"?}]`), `reasoning_content` on an
assistant message (from a `reasoning_content`, `thinking` or `reasoning` field, or a leading `<think>...</think>` in
the content), and `tool_call_id` / `name` on a `tool` message. sharegpt's `function_call` turns become assistant
messages with `tool_calls`, its `observation` turns `tool` messages; so does OpenAI's older `function_call` field on
an assistant message (with `function` role results).

Tool call arguments and the `tools` schemas are kept as canonical JSON strings (checked here, parsed back to objects
by `encode` just before the chat template renders them): Arrow stores rows of differing argument keys or schemas
only as text without inventing null fields. Problems come back as `Problem` strings (a kind shared by all the rows
with it, and the row's own detail), which `formats.Problems` groups and reports with the rows' lines.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "chatgpt": "assistant", "bot": "assistant", "system": "system", "tool": "tool", "observation": "tool",
         "function": "tool", "ipython": "tool", "function_call": "assistant"}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_DEPTH = 64
"""How deep tool call arguments, tool results and `tools` schemas may nest (objects and lists in one another): far
beyond any real schema, and far below the depth at which parsing, the chat template or Arrow run out of stack."""
TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels (the cap for tool calls, results and schemas; flatten it)"


class Problem(str):
    """A row problem: the string is its kind (shared by every row with it), `detail` says where in this row."""

    detail: str

    def __new__(cls, kind: str, detail: str = "") -> Problem:
        obj = super().__new__(cls, kind)
        obj.detail = detail
        return obj


def nested_deeper(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when objects and lists nest in `value` more than `limit` levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return False


def _loads(text: str) -> Any:
    """`json.loads`, with nesting too deep for the parser raised as the JSONDecodeError kinds are handled."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(TOO_DEEP, text, 0) from None


def text_of(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a list of {type: text, text: ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def _arguments(value: Any, where: str) -> str | Problem:
    """A tool call's arguments as canonical JSON text of an object."""
    if value is None or value == "":
        value = {}
    if isinstance(value, str):
        try:
            value = _loads(value)
        except json.JSONDecodeError as e:
            if e.msg == TOO_DEEP:
                return Problem(f"tool call arguments in {TOO_DEEP}", where)
            return Problem("tool call arguments that are not valid JSON (write them as a JSON object)",
                           f"{where}: {e.msg} at character {e.pos}")
    if not isinstance(value, dict):
        return Problem("tool call arguments that are not a JSON object (arguments map parameter names to values)",
                       f"{where}: a {type(value).__name__}")
    if nested_deeper(value):
        return Problem(f"tool call arguments in {TOO_DEEP}", where)
    return json.dumps(value, ensure_ascii=False)


def tool_calls(value: Any, where: str) -> list[dict[str, Any]] | Problem:
    """Normalised tool calls of an assistant message (`where` names the message, for problems)."""
    if isinstance(value, str):
        try:
            value = _loads(value)
        except json.JSONDecodeError as e:
            return Problem("'tool_calls' text that is not valid JSON", f"{where}: {e.msg} at character {e.pos}")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return Problem("'tool_calls' that is not a list of calls", f"{where}: a {type(value).__name__}")
    out = []
    for j, call in enumerate(value):
        at = f"{where}, call {j + 1}"
        fn = call.get("function", call) if isinstance(call, dict) else None  # also the flat {name, arguments}
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            return Problem("a tool call without a function name (calls look like {\"type\": \"function\", "
                           "\"function\": {\"name\": ..., \"arguments\": {...}}})", at)
        args = _arguments(fn.get("arguments", fn.get("parameters")), f"{at} '{name}'")
        if isinstance(args, Problem):
            return args
        norm: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call, dict) and call.get("id") not in (None, ""):
            norm["id"] = str(call["id"])
        out.append(norm)
    return out


def _sharegpt_call(value: Any, where: str) -> list[dict[str, Any]] | Problem:
    """The calls of a sharegpt `function_call` turn: JSON text of one call {name, arguments} or a list of them."""
    if isinstance(value, str):
        try:
            value = _loads(value)
        except json.JSONDecodeError as e:
            return Problem("a function_call turn that is not valid JSON (its value is the call: {\"name\": ..., "
                           "\"arguments\": {...}})", f"{where}: {e.msg} at character {e.pos}")
    return tool_calls(value, where)


def _reasoning(item: dict[str, Any], role: str, content: str, where: str) -> tuple[str, str | None] | Problem:
    """(content, reasoning or None): the reasoning field, or a leading <think>...</think> moved out of the content."""
    fields = [f for f in REASONING_FIELDS if item.get(f) not in (None, "")]
    if fields and role != "assistant":
        return Problem("reasoning on a turn that is not the assistant's (only the model reasons; move it to the "
                       "assistant message or drop the field)", f"{where} has '{fields[0]}'")
    if role != "assistant":
        return content, None
    reasoning = item[fields[0]] if fields else None
    if reasoning is not None and not isinstance(reasoning, str):
        return Problem("reasoning that is not text", f"{where}: '{fields[0]}' is a {type(reasoning).__name__}")
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        if THINK_CLOSE not in stripped:
            return Problem(f"an assistant message that opens {THINK_OPEN} and never closes it", where)
        if reasoning is not None:
            return Problem(f"reasoning given twice (a '{fields[0]}' field and {THINK_OPEN} in the content)", where)
        inner, _, content = stripped[len(THINK_OPEN):].partition(THINK_CLOSE)
        reasoning, content = inner, content.lstrip()
    reasoning = reasoning.strip() if reasoning is not None else None
    return content, reasoning or None


def normalise_message(item: Any, default_role: str, where: str) -> dict[str, Any] | Problem:
    """One message (role/content or from/value, with tool calls and reasoning) in the normalised shape."""
    if isinstance(item, str):
        return {"role": default_role, "content": item}
    if not isinstance(item, dict):
        return Problem("a message that is not an object with role and content", where)
    raw_role = str(item.get("role", item.get("from", ""))).lower()
    role = ROLES.get(raw_role)
    if role is None:
        return Problem(f"a message with an unknown role (known: {', '.join(ROLES)})",
                       f"{where}: '{item.get('role', item.get('from'))}'")
    raw = item.get("content", item.get("value"))
    where = f"{where} ({raw_role})"
    calls: list[dict[str, Any]] | Problem = []
    if raw_role == "function_call":
        calls, raw = _sharegpt_call(raw, where), ""
    elif item.get("tool_calls") not in (None, []) or item.get("function_call") not in (None, {}):
        if role != "assistant":
            return Problem("tool calls on a turn that is not the assistant's (only the model calls tools; move them to "
                           "the assistant message)", where)
        given = item.get("tool_calls") or item["function_call"]  # function_call: OpenAI's older single-call field
        calls = tool_calls(given, where)
    if isinstance(calls, Problem):
        return calls
    if raw is None and (calls or role == "tool"):
        raw = ""
    if role == "tool" and isinstance(raw, dict | list) and text_of(raw) is None:
        if nested_deeper(raw):
            return Problem(f"a tool result in {TOO_DEEP}", where)
        raw = json.dumps(raw, ensure_ascii=False)  # a structured tool result: the model reads it as JSON text
    content = text_of(raw)
    if content is None:
        return Problem("a message whose content is not text", where)
    split = _reasoning(item, role, content, where)
    if isinstance(split, Problem):
        return split
    content, reasoning = split
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = calls
    if reasoning:
        out["reasoning_content"] = reasoning
    if role == "tool":
        out.update({k: str(item[k]) for k in ("tool_call_id", "name") if item.get(k) not in (None, "")})
    return out


def check_tool_results(messages: list[dict[str, Any]]) -> Problem | None:
    """A problem when a tool result answers no call: no assistant tool call before it (since the last user turn),
    more results than calls, or a `tool_call_id` that no call of the turn has."""
    calls: list[dict[str, Any]] = []
    answered, inline = 0, False
    for k, m in enumerate(messages):
        if m["role"] == "user":
            calls, answered, inline = [], 0, False
        elif m["role"] == "assistant":
            if m.get("tool_calls"):
                calls, answered = m["tool_calls"], 0
            inline = "<tool_call>" in m["content"]  # Hermes-style rows write the call into the text
        elif m["role"] == "tool":
            where = f"message {k + 1} (tool)"
            if answered >= len(calls):
                more = f": {len(calls)} call(s), more results" if calls else ""
                if inline and not calls:
                    more = (": the assistant message before it writes the call as <tool_call> text; give it as "
                            "tool_calls (name, arguments) so the chat template renders it")
                return Problem("a tool result with no tool call before it (each tool message answers a call of the "
                               "assistant message before it: add the call, or drop the result)", where + more)
            ids = {c["id"] for c in calls if "id" in c}
            if m.get("tool_call_id") and ids and m["tool_call_id"] not in ids:
                return Problem("a tool result whose tool_call_id matches no call before it",
                               f"{where}: '{m['tool_call_id']}' (calls: {', '.join(sorted(ids))})")
            answered += 1
    return None


def normalise_tools(value: Any) -> str | None | Problem:
    """The `tools` column as canonical JSON text of a list of function schemas ({"type": "function", "function":
    {"name", "description"?, "parameters"?}}; a bare {"name", ...} schema is wrapped so), or None when empty."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = _loads(value)
        except json.JSONDecodeError as e:
            return Problem("a 'tools' column that is not valid JSON (write it as a JSON list of schemas)",
                           f"{e.msg} at character {e.pos}")
        if value == []:
            return None
    kind = ("a 'tools' column that is not a list of JSON schemas (each one {\"type\": \"function\", \"function\": "
            "{\"name\": ..., \"parameters\": {...}}})")
    if not isinstance(value, list):
        return Problem(kind, f"a {type(value).__name__}")
    if nested_deeper(value):
        return Problem(f"a 'tools' column in {TOO_DEEP}")
    out = []
    for j, schema in enumerate(value):
        fn = schema.get("function", schema) if isinstance(schema, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            return Problem(kind, f"tool {j + 1}: " + ("no function name" if isinstance(fn, dict)
                                                       else f"a {type(schema).__name__}"))
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            return Problem(kind, f"tool {j + 1} '{fn['name']}': parameters is a {type(fn['parameters']).__name__}")
        out.append(schema if "function" in schema else {"type": "function", "function": fn})
    return json.dumps(out, ensure_ascii=False)


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates read them: tool call arguments as objects, keys holding None left out (a
    column store fills keys that other rows have with None)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _as_object(c["function"])}}
                               for c in m["tool_calls"]]
        elif "tool_calls" in m:
            del m["tool_calls"]
        out.append(m)
    return out


def _as_object(fn: dict[str, Any]) -> Any:
    args = fn.get("arguments")
    return json.loads(args) if isinstance(args, str) else (args or {})


def tools_for_template(tools: Any) -> list[dict[str, Any]] | None:
    """The normalised `tools` column (JSON text) as the list of schemas a chat template reads."""
    if tools in (None, "", []):
        return None
    return json.loads(tools) if isinstance(tools, str) else tools
