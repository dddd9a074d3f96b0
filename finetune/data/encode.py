"""Token ids and labels of one sample: the chat template renders the text, label masks come from character spans.

For each assistant turn the template is rendered twice: the conversation before it with the generation prompt
(`head`), and the conversation up to and including it (`full`). The characters between the two are what the model
must produce: the answer and its end-of-turn token, which is always trained (anything the template writes after
that token, such as a newline, is not). The whole text is then tokenized once and a token carries a label when its
last character falls inside a trained span, so the ids are exactly what `apply_chat_template` would give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], eot: str | None) -> tuple[str, list[tuple]]:
    """The rendered conversation and the (start, end) character spans that carry labels (one per assistant turn)."""
    text, spans = "", []
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = render(tokenizer, messages[:i], generation_prompt=True)
            full = render(tokenizer, messages[: i + 1])
            if not head.startswith(text) or not full.startswith(head):
                raise EncodeError(PREFIX_PROBLEM)
            body = full[len(head) :]
            end = len(head) + body.rindex(eot) + len(eot) if eot and eot in body else len(full)
            spans.append((len(head), end))
            text = full
        if messages[-1]["role"] != "assistant":
            full = render(tokenizer, messages)
            if not full.startswith(text):
                raise EncodeError(PREFIX_PROBLEM)
            text = full
    except EncodeError:
        raise
    except Exception as e:  # jinja raises for conversations a template refuses (e.g. roles out of order)
        raise EncodeError(f"refused by the chat template ({e})") from None
    return text, spans


def encode_messages(tokenizer: Any, messages: list[dict[str, str]], train_on: str, template: TemplateInfo) -> Encoded:
    """Ids and labels of a conversation: assistant turns (with their end-of-turn token) trained, or everything."""
    eot, eot_id = template.end_of_turn, template.end_of_turn_id
    turns = sum(m["role"] == "assistant" for m in messages)
    if train_on == "all":
        try:
            text = render(tokenizer, messages)
        except Exception as e:
            raise EncodeError(f"refused by the chat template ({e})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return Encoded(ids, list(ids), turns, max(0, turns - ids.count(eot_id)))
    text, spans = assistant_spans(tokenizer, messages, eot)
    ids, last = _ids_and_last_chars(tokenizer, text, spans)
    return _labelled(ids, last, spans, turns, eot_id)


def encode_messages_many(tokenizer: Any, conversations: list[list[dict[str, str]]], train_on: str,
                         template: TemplateInfo) -> list[Encoded | EncodeError]:
    """`encode_messages` of many conversations, the texts tokenized in one call (the same ids and labels; the error
    in place of a conversation that cannot be encoded). Saves the tokenizer's per-call cost on every row."""
    if train_on == "all" or not conversations:
        return [_or_error(encode_messages, tokenizer, m, train_on, template) for m in conversations]
    import numpy as np

    out: list[Encoded | EncodeError | None] = [None] * len(conversations)
    rendered = []
    for k, messages in enumerate(conversations):
        try:
            rendered.append((k, *assistant_spans(tokenizer, messages, template.end_of_turn)))
        except EncodeError as e:
            out[k] = e
    try:
        texts = [text for _, text, _ in rendered]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    except (NotImplementedError, ValueError, KeyError):  # no offsets: one by one (see _ids_and_last_chars)
        enc = None
    for j, (k, text, spans) in enumerate(rendered):
        turns = sum(m["role"] == "assistant" for m in conversations[k])
        if enc is None:
            ids, last = _ids_and_last_chars(tokenizer, text, spans)
        else:
            ids = enc["input_ids"][j]
            last = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)[:, 1] - 1
        out[k] = _labelled(ids, last, spans, turns, template.end_of_turn_id)
    return out  # type: ignore[return-value]


def encode_texts(tokenizer: Any, texts: list[str]) -> list[Encoded]:
    """`encode_text` of many texts, tokenized in one call (the same ids)."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        out.append(Encoded(ids, list(ids)))
    return out


def _or_error(fn, *args) -> Encoded | EncodeError:
    try:
        return fn(*args)
    except EncodeError as e:
        return e


def _labelled(ids: list[int], last: Any, spans: list[tuple[int, int]], turns: int, eot_id: int | None) -> Encoded:
    """A sample whose tokens carry labels when their last character (`last`, numpy) lies in one of `spans`."""
    import numpy as np  # here, not at the top: `ft validate` imports this package and should stay light

    if not spans:
        return Encoded(ids, [IGNORE] * len(ids), turns, 0)
    starts, ends = np.array([a for a, _ in spans]), np.array([b for _, b in spans])
    span = np.searchsorted(starts, last, side="right") - 1  # the span each token's last character may be in
    inside = (span >= 0) & (last < ends[np.maximum(span, 0)])
    array = np.asarray(ids)
    labels = np.where(inside, array, IGNORE).tolist()
    with_eot = len(np.unique(span[inside & (array == eot_id)])) if eot_id is not None else 0
    return Encoded(ids, labels, turns, len(spans) - with_eot)


def _ids_and_last_chars(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], Any]:
    """Token ids of `text` and the index of each token's last character (a numpy array)."""
    import numpy as np

    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # the transformers call, not the backend's: ids must be exactly what apply_chat_template gives
        return enc["input_ids"], np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 1] - 1
    except (NotImplementedError, ValueError, KeyError):
        # Tokenizers without offsets (Python and mistral-common ones): tokenize piece by piece, cut at the span edges.
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        ids, last = [], []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            last += [b - 1] * len(piece)
        return ids, np.asarray(last, dtype=np.int64)


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
                   sample.turns_without_eot)
