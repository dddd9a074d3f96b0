"""Special-token text inside messages (`data.special_tokens_in_content`): found, refused, escaped or allowed.

A tokenizer turns the text of its special tokens (`<|im_end|>`, `<|im_start|>`, `</s>`, `<unk>`...) into the control
tokens themselves wherever it meets them, so a message whose content holds `<|im_end|>\\n<|im_start|>user ...` would
train forged turns. The chat template's own control tokens are the only ones a sample may hold:

    refuse  (default) a row whose message content, reasoning or tool call holds such text is refused, naming its file
            and line (`ft data preview`, `ft validate`, `ft train` before the first step)
    escape  that text is tokenized as plain text (`split_special_tokens` on exactly those characters); the template's
            tokens stay control tokens, and a row without such text gets the very same ids as before (sft only: trl
            tokenizes the rows of the other stage kinds itself)
    allow   tokenized as control tokens, as the tokenizer does by default (counted and reported)

Escaping renders the conversation with each special string replaced by a run of private-use characters of the same
length, so the template's character spans stay where they are, then puts the strings back and tokenizes the text in
pieces: the runs with special tokens split, the rest as usual. Plain `text` rows are left alone (pre-rendered chat
text holds the control tokens on purpose).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PRIVATE = 0xE000  # first private-use code point: stands in for special strings while the template renders
FIX = ("; remove it from the data, or set data.special_tokens_in_content: escape (tokenized as plain text) or allow "
       "(tokenized as the control token)")
NO_ESCAPE = "; remove it from the data, or set data.special_tokens_in_content: allow (tokenized as the control token)"


def _trie(strings: tuple[str, ...]) -> str:
    """A regular expression matching any of `strings` (the longest where several start alike), built as a trie so
    that a tokenizer with thousands of special tokens (`<unused123>`) costs about what one with ten does."""
    root: dict[str, dict] = {}
    for text in strings:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict[str, dict]) -> str:
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 and "" not in node else f"(?:{'|'.join(alts)})"
        return body + ("?" if "" in node else "")

    return pattern(root)


class Specials:
    """The text of a tokenizer's special tokens (longest first, blank ones left out) and one pattern finding any."""

    def __init__(self, strings: Any):
        self.strings = tuple(sorted({t for t in strings if t.strip()}, key=lambda t: (-len(t), t)))
        self.pattern = re.compile(_trie(self.strings)) if self.strings else None  # fast with thousands of tokens

    @classmethod
    def of(cls, tokenizer: Any) -> Specials:
        """The special tokens of `tokenizer` (added tokens marked special, and bos/eos/pad/unk...)."""
        found = {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
        found |= {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        return cls(found)

    @classmethod
    def from_files(cls, model: str, extra: tuple[str, ...] = ()) -> Specials | None:
        """The special tokens of a local model folder's tokenizer, read from its JSON files without loading it (for
        `ft validate`), plus `extra` (a registry template's); None when the folder has no tokenizer.json."""
        folder = Path(model)
        try:
            added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) if (
                folder / "tokenizer_config.json").is_file() else {}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return None
        config = config if isinstance(config, dict) else {}
        found = {str(a.get("content")) for a in added if isinstance(a, dict) and a.get("special")}
        more = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        named = [config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                                         "mask_token")] + list(more.values() if isinstance(more, dict) else more)
        found |= {str(t.get("content") if isinstance(t, dict) else t) for t in named if t}
        found |= set(extra)
        return cls(found)

    def first(self, text: str) -> str | None:
        """The first special string in `text`, or None."""
        m = self.pattern.search(text) if self.pattern is not None else None
        return m.group(0) if m else None

    def used(self, messages: list[dict[str, Any]]) -> tuple[str, ...]:
        """The special strings that occur in the messages' texts, longest first."""
        found = {m.group(0) for message in messages for text in _texts(message)
                 for m in (self.pattern.finditer(text) if self.pattern is not None else ())}
        return tuple(s for s in self.strings if s in found)


def _texts(message: dict[str, Any]) -> list[str]:
    """The texts of a message that come from the data: content, reasoning, tool calls (name and arguments)."""
    out = [message.get("content"), message.get("reasoning_content")]
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        out.append(function.get("name") if isinstance(function, dict) else None)
        args = function.get("arguments") if isinstance(function, dict) else None
        out.append(args if isinstance(args, str) or args is None else json.dumps(args, ensure_ascii=False))
    return [t for t in out if isinstance(t, str) and t]


def found_in(messages: list[dict[str, Any]], specials: Specials) -> list[tuple[int, str, str]]:
    """(message index, role, special string) of the first special string in each message that holds one."""
    out = []
    for i, message in enumerate(messages):
        for text in _texts(message):
            hit = specials.first(text)
            if hit is not None:
                out.append((i, str(message.get("role")), hit))
                break
    return out


def problem(found: list[tuple[int, str, str]]) -> str:
    """The refusal of a row, naming the first message's role and special text (rows with the same share one line)."""
    _, role, token = found[0]
    return (f"special-token text {token!r} in a message ({role}): the tokenizer would read it as the control token "
            f"itself, training forged turns{FIX}")


class CannotEscape(ValueError):
    """A row whose special-token text is refused or cannot be escaped; the message says what to do."""


def with_placeholders(messages: list[dict[str, Any]], specials: tuple[str, ...]) -> list[dict[str, Any]]:
    """The messages with each special string (`Specials.used`) in their content and reasoning replaced by a run of one
    private-use character as long as the string (the character says which string).

    Raises:
        CannotEscape: The row holds such characters already.
    """
    clash = re.compile(f"[{chr(PRIVATE)}-{chr(PRIVATE + len(specials) - 1)}]")
    if any(clash.search(text) for message in messages for text in _texts(message)):
        raise CannotEscape("special-token text in a row that holds private-use characters (U+E000...) cannot be "
                           f"escaped{NO_ESCAPE}")
    if Specials(specials).used([{"tool_calls": m.get("tool_calls")} for m in messages if m.get("tool_calls")]):
        raise CannotEscape(f"special-token text in a tool call (its name or arguments) cannot be escaped{NO_ESCAPE}")
    out = []
    for message in messages:
        copy = dict(message)
        for key in ("content", "reasoning_content"):
            if isinstance(copy.get(key), str):
                for k, token in enumerate(specials):
                    copy[key] = copy[key].replace(token, chr(PRIVATE + k) * len(token))
        out.append(copy)
    return out


def restored(text: str, specials: tuple[str, ...]) -> tuple[str, list[tuple[int, int]]] | None:
    """The rendered text with the special strings back, and their (start, end) character ranges; None when the
    template changed a placeholder run (the row cannot be escaped)."""
    runs = re.compile(f"([{chr(PRIVATE)}-{chr(PRIVATE + max(len(specials) - 1, 0))}])\\1*")  # one character each
    ranges, parts, at = [], [], 0
    for m in runs.finditer(text):
        run = m.group(0)
        token = specials[ord(run[0]) - PRIVATE]
        if len(run) % len(token):
            return None
        parts += [text[at : m.start()], token * (len(run) // len(token))]
        ranges.append((m.start(), m.end()))
        at = m.end()
    return "".join([*parts, text[at:]]), ranges


def tokenized_in_pieces(tokenizer: Any, text: str, plain: list[tuple[int, int]], last_chars: Any
                        ) -> tuple[list[int], Any]:
    """Token ids of `text` and each token's last character (numpy), the `plain` ranges tokenized with special tokens
    split (as text), the rest as `tokenizer(text)` would. `last_chars`: encode.last_chars."""
    import numpy as np

    ids: list[int] = []
    last: list[Any] = []
    cuts = sorted({0, len(text), *(c for r in plain for c in r)})
    inside = set(plain)
    special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    for a, b in zip(cuts, cuts[1:], strict=False):
        split = (a, b) in inside
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split)
        if split and special_ids.intersection(enc["input_ids"]):  # a vocabulary that spells it as a plain word too
            raise CannotEscape(f"this tokenizer reads {text[a:b]!r} as its control token even as plain text, so it "
                               f"cannot be escaped{NO_ESCAPE}")
        ids += enc["input_ids"]
        last.append(last_chars(tokenizer, text[a:b], enc["input_ids"], enc["offset_mapping"]) + a)
    return ids, np.concatenate(last) if last else np.zeros(0, dtype=np.int64)


def screened(messages: list[dict[str, Any]], specials: Any, mode: str
             ) -> tuple[list[dict[str, Any]], tuple[str, ...], bool]:
    """(the messages to render, the special strings escaped in them, whether any message holds special-token text)
    under `mode` (`data.special_tokens_in_content`). `specials`: a Specials, or the tokenizer to take them from.

    Raises:
        CannotEscape: `refuse` and a message holds special-token text (the row's refusal), or it cannot be escaped.
    """
    specials = specials if isinstance(specials, Specials) else Specials.of(specials)
    found = found_in(messages, specials)
    if found and mode == "refuse":
        raise CannotEscape(problem(found))
    escaped = specials.used(messages) if found and mode == "escape" else ()
    return (with_placeholders(messages, escaped) if escaped else messages), escaped, bool(found)


def plain_ids(tokenizer: Any, text: str, escaped: tuple[str, ...], last_chars: Any) -> tuple[list[int], Any]:
    """Ids and last characters of a text rendered `with_placeholders`: the special strings put back and tokenized
    as plain text, the rest as usual.

    Raises:
        CannotEscape: The template changed a stand-in, or the tokenizer cannot split special tokens with offsets.
    """
    back = restored(text, escaped)
    if back is None:
        raise CannotEscape(f"special-token text that the chat template changes cannot be escaped{NO_ESCAPE}")
    try:
        return tokenized_in_pieces(tokenizer, *back, last_chars)
    except CannotEscape:
        raise
    except (NotImplementedError, ValueError, KeyError, TypeError):
        raise CannotEscape("this tokenizer cannot tokenize special-token text as plain text (no offsets or "
                           f"split_special_tokens){NO_ESCAPE}") from None


def rows_with_special_text(rows: list[dict[str, Any]], specials: Specials
                           ) -> list[tuple[int, list[tuple[int, str, str]]]]:
    """(row index, what `found_in` says) of each normalised row (messages, or prompt/chosen/rejected/completion
    message lists) that holds special-token text."""
    out = []
    for i, row in enumerate(rows):
        if row is None:
            continue
        messages = [m for key in ("messages", "prompt", "chosen", "rejected", "completion")
                    if isinstance(row.get(key), list) for m in row[key] if isinstance(m, dict)]
        if found := found_in(messages, specials):
            out.append((i, found))
    return out


def special_text_rows(table: Any, rows: list[dict[str, Any]], data: Any, specials: Specials | None) -> int:
    """`ft validate`'s check of one source's normalised rows: the rows whose messages hold special-token text are
    refused (FinetuneError naming file and lines) under `refuse`, else counted and said. Returns their count."""
    from finetune.data.formats import Problems
    from finetune.data.messages import Problem

    found = rows_with_special_text(rows, specials) if specials is not None else []
    if found and data.special_tokens_in_content == "refuse":
        problems = Problems(table)
        for i, what in found:
            problems.add(Problem(problem(what)), i)
        problems.raise_if_any("rows with special-token text in their messages")
    if found:
        how = "as plain text" if data.special_tokens_in_content == "escape" else "as control tokens"
        print(f"[preflight] {table.key} ({table.path}): {len(found)} rows hold special-token text in messages, "
              f"tokenized {how} (data.special_tokens_in_content: {data.special_tokens_in_content})", flush=True)
    return len(found)

