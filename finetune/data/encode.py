"""Token ids and labels of one sample: the chat template renders the text, label masks come from character spans.

The whole conversation is rendered once (with the row's `tools`), exactly as `apply_chat_template` renders it. For
each assistant turn the conversation before it is rendered with the generation prompt (`head`), which must be the
start of the whole text; the turn's trained span runs from there to its end-of-turn token, inclusive (the last one
the turn's own rendering holds; anything the template writes after it, such as a newline, is not trained). The span
holds what the model must produce: its reasoning as the template renders it, the answer, the tool calls. Tool
results, user and system turns lie outside every span. Templates that render a turn differently once later turns
follow (Qwen3 drops the reasoning of turns before the last user message) are handled as the template renders the
whole conversation: such a turn ends at the first end-of-turn token after its head, and a turn whose reasoning the
template drops trains without it. With `train_on_reasoning` off, a turn's span starts after its reasoning and the
template's closing marker (`</think>`), so the reasoning is context, not target. The text is tokenized once and a
token carries a label when its last character falls inside a trained span.

Special-token text inside a message (a forged `<|im_end|>`) is refused, escaped or allowed: `special_text`.

`encode_example` is the per-row entry point (a normalised row in, ids and labels out); `encode_many` encodes a batch
of rows with one tokenizer call per kind (the same ids and labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.data import special_text
from finetune.data.messages import for_template, tools_for_template
from finetune.data.templates import TemplateInfo, render

IGNORE = -100

PREFIX_PROBLEM = (
    "rendered by the chat template differently once later turns are added (it does not render conversations "
    "prefix by prefix, e.g. it rewrites earlier turns), so assistant turns cannot be located; use a registry "
    "template (data.template: chatml, llama-3, ...) or data.train_on: all"
)


class EncodeError(ValueError):
    """A sample that cannot be encoded; the message says why, as in '<n> rows: <message>'."""


@dataclass
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    labels: list[int]
    assistant_turns: int = 0
    turns_without_eot: int = 0  # assistant turns whose end-of-turn token carries no label
    stats: dict[str, int] = field(default_factory=dict)  # tool calls, tool results, reasoning given/rendered/trained


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], eot: str | None,
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character span of each assistant turn (one per turn)."""
    try:
        text = render(tokenizer, messages, tools=tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
            if not text.startswith(head) or (spans and len(head) < spans[-1][1]):
                raise EncodeError(PREFIX_PROBLEM)
            upto = render(tokenizer, messages[: i + 1], tools=tools)
            if text.startswith(upto):  # the turn renders the same with or without what follows it
                body = upto[len(head) :]
                end = len(head) + body.rindex(eot) + len(eot) if eot and eot in body else len(upto)
            elif eot and text.find(eot, len(head)) >= 0:  # rendered otherwise once later turns follow: its own eot
                end = text.find(eot, len(head)) + len(eot)
            else:
                raise EncodeError(PREFIX_PROBLEM)
            spans.append((len(head), end))
    except EncodeError:
        raise
    except Exception as e:  # jinja raises for conversations a template refuses (e.g. roles out of order)
        raise EncodeError(f"refused by the chat template ({e})") from None
    return text, spans


def _template_input(tokenizer: Any, messages: list[dict[str, Any]], tools: Any
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, Any]:
    """(messages, tools, probe.Support or None) as the template reads them; refuses what it would drop."""
    messages, schemas = for_template(messages), tools_for_template(tools)
    calls, results = any(m.get("tool_calls") for m in messages), any(m["role"] == "tool" for m in messages)
    if not (schemas or calls or results or any(m.get("reasoning_content") for m in messages)):
        return messages, schemas, None
    from finetune.data.probe import for_support, support

    found = support(tokenizer)
    dropped = [what for what, used, ok in (("the tools column", schemas, found.tools), ("tool calls", calls,
               found.tool_calls), ("tool results", results, found.tool_results)) if used and not ok]
    if dropped:
        raise EncodeError(
            f"{' and '.join(dropped)} that the chat template does not render (it ignores them, so training would "
            "silently cut them out); use the model's own template if it supports tools (data.template: tokenizer) "
            "or a Jinja file that renders tools, tool_calls and tool messages")
    return for_support(messages, found), schemas, found


def _dropping_as_the_template(tokenizer: Any, messages: list[dict[str, Any]], schemas: Any, found: Any
                              ) -> list[dict[str, Any]]:
    """The messages without the past reasoning the template drops, when that renders the whole conversation the
    same (Qwen3: else a turn after a tool result would find earlier turns rendered with their reasoning)."""
    from finetune.data.probe import without_dropped_reasoning

    stripped = without_dropped_reasoning(messages, found)
    if stripped is messages or stripped == messages:
        return messages
    try:
        same = render(tokenizer, stripped, tools=schemas) == render(tokenizer, messages, tools=schemas)
    except Exception:  # refused either way: assistant_spans reports it
        return messages
    return stripped if same else messages


def _reasoning_stats(text: str, spans: list[tuple[int, int]], reasoning: list[str], found: Any,
                     train_on_reasoning: bool) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """The spans with each rendered reasoning left out when it is not trained, and the reasoning counts."""
    stats = {"reasoning_turns": sum(bool(r) for r in reasoning), "reasoning_rendered": 0, "reasoning_trained": 0}
    opening, close = (found.reasoning_open, found.reasoning_close) if found else ("", "")
    out = []
    for (start, end), r in zip(spans, reasoning, strict=True):
        if not r:
            at = -1
        elif opening is not None:  # where the template puts it: right after the turn's opening marker
            at = start + len(opening) if text.startswith(opening + r, start) else -1
        else:
            at = text.find(r, start, end)
        if at >= 0:
            stats["reasoning_rendered"] += 1
            if train_on_reasoning:
                stats["reasoning_trained"] += 1
            else:
                after = at + len(r)
                start = after + len(close) if close and text.startswith(close, after) else after
        out.append((start, end))
    return out, stats


def encode_messages(tokenizer: Any, messages: list[dict[str, Any]], train_on: str, template: TemplateInfo,
                    tools: Any = None, train_on_reasoning: bool = True, special: str = "refuse") -> Encoded:
    """Ids and labels of a conversation: assistant turns (with their end-of-turn token) trained, or everything.

    Args:
        tokenizer: The tokenizer carrying the chat template.
        messages: Normalised messages (`messages.normalise_message`): tool calls, tool results, reasoning.
        train_on: `assistant` or `all`.
        template: What `apply_template` reported (the end-of-turn token).
        tools: The row's tool schemas (a list, or its JSON text), passed to the template.
        train_on_reasoning: Whether the reasoning of assistant turns carries labels (`assistant` only).
        special: `data.special_tokens_in_content`: `refuse`, `escape` or `allow` special-token text in messages.

    Raises:
        EncodeError: The template refuses the conversation, drops its tools or calls, or rewrites earlier turns; a
            message holds special-token text and `special` is `refuse`.
    """
    prepared = prepared_messages(tokenizer, messages, train_on, template, tools, train_on_reasoning, special)
    if isinstance(prepared, Encoded):
        return prepared
    text, spans, turns, stats = prepared
    ids, last = ids_and_last_chars(tokenizer, text, spans)
    return labelled(ids, last, spans, turns, template.end_of_turn_id, stats)


def prepared_messages(tokenizer: Any, messages: list[dict[str, Any]], train_on: str, template: TemplateInfo,
                      tools: Any = None, train_on_reasoning: bool = True, special: str = "refuse"
                      ) -> Encoded | tuple[str, list[tuple[int, int]], int, dict[str, int]]:
    """What `encode_messages` does before tokenizing: the rendered text, the trained character spans, the assistant
    turn count and the counts (or, for `train_on: all` and rows with escaped special-token text, the finished
    sample). Lets callers tokenize many at once.

    Raises:
        EncodeError: as `encode_messages`.
    """
    try:  # escaped: rendered with stand-ins of the same length, tokenized as text once put back (special_text)
        shown, escaped, found = special_text.screened(messages, template.specials or tokenizer, special)
        prepared = _prepared(tokenizer, shown, train_on, template, tools, train_on_reasoning)
        prepared[-1]["special_text"] = int(found)
        if not escaped:
            return prepared[0] if prepared[0] is not None else prepared[1:]
        _, text, spans, turns, stats = prepared
        ids, last = special_text.plain_ids(tokenizer, text, escaped, last_chars)
    except special_text.CannotEscape as e:  # or refused
        raise EncodeError(str(e)) from None
    if train_on == "all":
        return Encoded(ids, list(ids), turns, max(0, turns - ids.count(template.end_of_turn_id)), stats)
    return labelled(ids, last, spans, turns, template.end_of_turn_id, stats)


def _prepared(tokenizer: Any, messages: list[dict[str, Any]], train_on: str, template: TemplateInfo, tools: Any,
              train_on_reasoning: bool) -> tuple[Encoded | None, str, list[tuple[int, int]], int, dict[str, int]]:
    """(the finished sample for `train_on: all` or None, rendered text, trained spans, assistant turns, counts)."""
    eot, eot_id = template.end_of_turn, template.end_of_turn_id
    turns = sum(m["role"] == "assistant" for m in messages)
    reasoning = [m.get("reasoning_content") or "" for m in messages if m["role"] == "assistant"]
    messages, schemas, found = _template_input(tokenizer, messages, tools)
    stats = {"tool_calls": sum(len(m.get("tool_calls") or []) for m in messages),
             "tool_results": sum(m["role"] == "tool" for m in messages)}
    if train_on == "all":
        try:
            text = render(tokenizer, messages, tools=schemas)
        except Exception as e:
            raise EncodeError(f"refused by the chat template ({e})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stats.update(trained_all=1, reasoning_turns=sum(bool(r) for r in reasoning))  # results trained too
        return Encoded(ids, list(ids), turns, max(0, turns - ids.count(eot_id)), stats), text, [], turns, stats
    if found is not None:
        messages = _dropping_as_the_template(tokenizer, messages, schemas, found)
    text, spans = assistant_spans(tokenizer, messages, eot, schemas)
    spans, more = _reasoning_stats(text, spans, reasoning, found, train_on_reasoning)
    stats.update(more)
    return None, text, spans, turns, stats


def labelled(ids: list[int], last: Any, spans: list[tuple[int, int]], turns: int, eot_id: int | None,
             stats: dict[str, int]) -> Encoded:
    """A sample whose tokens carry labels when their last character (`last`, numpy) lies in one of `spans`."""
    import numpy as np  # here, not at the top: `ft validate` imports this package and should stay light

    if not spans:
        return Encoded(ids, [IGNORE] * len(ids), turns, 0, stats)
    starts, ends = np.array([a for a, _ in spans]), np.array([b for _, b in spans])
    span = np.searchsorted(starts, last, side="right") - 1  # the span each token's last character may be in
    inside = (span >= 0) & (last < ends[np.maximum(span, 0)])
    array = np.asarray(ids)
    labels = np.where(inside, array, IGNORE).tolist()
    with_eot = len(np.unique(span[inside & (array == eot_id)])) if eot_id is not None else 0
    return Encoded(ids, labels, turns, len(spans) - with_eot, stats)


def encode_example(tokenizer: Any, example: dict[str, Any], data: Any, template: TemplateInfo) -> Encoded:
    """Ids and labels of one normalised row (`{"text"}`, or `{"messages", "tools"?}`) under the data section's
    `train_on` and `train_on_reasoning`: the per-row step of preprocessing.

    Raises:
        EncodeError: as `encode_messages`.
    """
    if example.get("messages") is None:
        return encode_text(tokenizer, example["text"])
    return encode_messages(tokenizer, example["messages"], data.train_on, template, tools=example.get("tools"),
                           train_on_reasoning=data.train_on_reasoning, special=data.special_tokens_in_content)


def ids_and_last_chars(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], Any]:
    """Token ids of `text` and the index of each token's last character (a numpy array)."""
    import numpy as np

    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # the transformers call, not the backend's: ids must be exactly what apply_chat_template gives
        return enc["input_ids"], last_chars(tokenizer, text, enc["input_ids"], enc["offset_mapping"])
    except (NotImplementedError, ValueError, KeyError):
        # Tokenizers without offsets (Python and mistral-common ones): tokenize piece by piece, cut at the span edges.
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        ids, last = [], []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            last += [b - 1] * len(piece)
        return ids, np.asarray(last, dtype=np.int64)


def last_chars(tokenizer: Any, text: str, ids: list[int], offsets: Any) -> Any:
    """The index of each token's last character (numpy), whitespace that a special token swallows not counted.

    Phi-3's chat tokens (and others added with `rstrip`) take the newline after them into their own offsets; their
    last character is then outside the assistant turn that they end, and the end-of-turn token would lose its label.
    """
    import numpy as np

    pairs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    last = pairs[:, 1] - 1
    swallowing = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "rstrip", False)}
    for k in (k for k, tid in enumerate(ids) if tid in swallowing):
        while last[k] > pairs[k, 0] and text[last[k]].isspace():
            last[k] -= 1
    return last


def encode_text(tokenizer: Any, text: str) -> Encoded:
    """Ids and labels of plain text: every token trained, the tokenizer's bos (if it adds one) and eos at the end."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    return Encoded(ids, list(ids))


def fit_length(sample: Encoded, max_length: int, policy: str) -> Encoded | None:
    """The sample within `max_length` tokens: cut at the end (`truncate`) or None (`drop`). Unchanged if it fits."""
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return None
    return Encoded(sample.input_ids[:max_length], sample.labels[:max_length], sample.assistant_turns,
                   sample.turns_without_eot, sample.stats)
