"""Many rows encoded at once: `encode.encode_example` of each, with the rendered texts tokenized in one tokenizer call
per kind (chat, plain text). The ids and labels are the per-row ones (tested); only the tokenizer's per-call cost is
saved, which dominates preprocessing of short rows.
"""

from __future__ import annotations

from typing import Any

from finetune.data.encode import Encoded, EncodeError, encode_example, labelled, last_chars, prepared_messages
from finetune.data.templates import TemplateInfo


def encode_many(tokenizer: Any, examples: list[dict[str, Any]], data: Any, template: TemplateInfo
                ) -> list[Encoded | EncodeError]:
    """`encode_example` of every normalised example (`{"text"}` or `{"messages", "tools"?}`), in order; the error in
    place of an example that cannot be encoded."""
    out: list[Encoded | EncodeError | None] = [None] * len(examples)
    chats: list[tuple[int, str, list[tuple[int, int]], int, dict[str, int]]] = []
    texts: list[tuple[int, str]] = []
    for k, ex in enumerate(examples):
        if ex.get("messages") is None:
            texts.append((k, ex["text"]))
            continue
        try:
            prepared = prepared_messages(tokenizer, ex["messages"], data.train_on, template, ex.get("tools"),
                                         data.train_on_reasoning, data.special_tokens_in_content)
        except EncodeError as e:
            out[k] = e
            continue
        if isinstance(prepared, Encoded):  # train_on: all, or special-token text escaped
            out[k] = prepared
        else:
            chats.append((k, *prepared))
    _chats(tokenizer, chats, template, out, examples, data)
    _texts(tokenizer, texts, out)
    return out  # type: ignore[return-value]


def _chats(tokenizer: Any, chats: list, template: TemplateInfo, out: list, examples: list, data: Any) -> None:
    if not chats:
        return
    try:
        enc = tokenizer([text for _, text, *_ in chats], add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, KeyError):  # no offsets (Python tokenizers): one by one
        for k, *_ in chats:
            out[k] = _or_error(tokenizer, examples[k], data, template)
        return
    for j, (k, _, spans, turns, stats) in enumerate(chats):
        last = last_chars(tokenizer, chats[j][1], enc["input_ids"][j], enc["offset_mapping"][j])
        out[k] = labelled(enc["input_ids"][j], last, spans, turns, template.end_of_turn_id, stats)


def _texts(tokenizer: Any, texts: list[tuple[int, str]], out: list) -> None:
    if not texts:
        return
    eos = tokenizer.eos_token_id
    for (k, _), ids in zip(texts, tokenizer([t for _, t in texts], add_special_tokens=True)["input_ids"],
                           strict=True):
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        out[k] = Encoded(ids, list(ids))


def _or_error(tokenizer: Any, ex: dict[str, Any], data: Any, template: TemplateInfo) -> Encoded | EncodeError:
    try:
        return encode_example(tokenizer, ex, data, template)
    except EncodeError as e:
        return e
