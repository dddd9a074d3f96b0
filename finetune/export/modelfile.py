"""An Ollama `Modelfile` beside a GGUF export: FROM, a TEMPLATE translated from the chat template, stop tokens and
the recipe's system prompt.

Ollama formats conversations with Go templates, not Jinja, so the chat template is translated. Translated are the
templates that wrap each message on its own: a fixed text before and after the content, per role, plus a generation
prompt (ChatML, Llama 3, Phi-3, the project's tiny model, and any template of that shape). The wrappers are found by
rendering probe conversations with the trained tokenizer's own template, and the translation is accepted only if it
reproduces that template's rendering of a longer conversation exactly (`render_parts`). Templates that merge
messages (Mistral's and Gemma's fold the system prompt into the first user turn) or inject other text of their own
are not translated: the export says so and writes no Modelfile. A default system prompt (SmolLM2's and Qwen2.5's
templates put one before a conversation that has none) becomes the Modelfile's SYSTEM, which Ollama puts first in the
same case, so that the two render the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_MARK = {"system": "\x01S\x01", "user": "\x01U\x01", "assistant": "\x01A\x01"}


@dataclass(frozen=True)
class TemplateParts:
    """A per-message chat template: text before and after each role's content, the generation prompt, and what
    comes before the first message."""

    wrap: dict[str, tuple[str, str]]
    generation_prompt: str
    start: str = ""
    default_system: str | None = None  # what the template puts first when a conversation has no system message


class Untranslatable(Exception):
    """The chat template has no per-message shape (the message says how it differs)."""


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def render_parts(parts: TemplateParts, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """What the translated template renders for `messages` (the Python twin of `go_template`, with Ollama's SYSTEM
    put first when the conversation has no system message)."""
    if parts.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": parts.default_system}, *messages]
    text = parts.start + "".join(parts.wrap[m["role"]][0] + m["content"] + parts.wrap[m["role"]][1]
                                 for m in messages)
    return text + (parts.generation_prompt if generation_prompt else "")


def template_parts(tokenizer: Any) -> TemplateParts:
    """The per-message wrappers of the tokenizer's chat template, checked against its own rendering.

    Raises:
        Untranslatable: as `_parts`, and for templates that refuse a probe conversation (Mistral's and Gemma's raise
            on a system message).
    """
    try:
        return _parts(tokenizer)
    except Untranslatable:
        raise
    except Exception as e:  # jinja's TemplateError from raise_exception(), and any other error of the template
        raise Untranslatable(f"the template refuses a system, user, assistant conversation ({e})") from None


def _parts(tokenizer: Any) -> TemplateParts:
    probe = [{"role": r, "content": _MARK[r]} for r in ROLES]
    try:
        start = _render(tokenizer, [])
    except Exception:  # templates that index messages[0]; transformers 5 refuses an empty conversation itself
        start = _leading_bos(tokenizer, probe)
    wrap, done = {}, start
    for i, role in enumerate(ROLES):
        text = _render(tokenizer, probe[: i + 1])
        if not text.startswith(done) or text[len(done):].count(_MARK[role]) != 1:
            raise Untranslatable(f"the {role} turn does not render as a wrapper around its content")
        before, after = text[len(done):].split(_MARK[role])
        wrap[role] = (before, after)
        done = text
    head = _render(tokenizer, probe[:2])
    with_prompt = _render(tokenizer, probe[:2], prompt=True)
    if not with_prompt.startswith(head):
        raise Untranslatable("the generation prompt is not appended after the last message")
    bos = _added_bos(tokenizer)
    if start and bos and start == bos:
        start = ""  # llama.cpp adds the bos token itself
    parts = TemplateParts(wrap=wrap, generation_prompt=with_prompt[len(head):], start=start)
    parts = _with_default_system(tokenizer, parts)
    test = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4+4?"}]
    for messages in (test, [{"role": "system", "content": "Be brief."}, *test]):
        expected = _render(tokenizer, messages, prompt=True)
        if bos and expected.startswith(bos) and not parts.start:
            expected = expected[len(bos):]
        if render_parts(parts, messages, True) != expected:
            raise Untranslatable("a longer conversation renders differently than message by message (the template "
                                 "merges messages or adds text of its own, e.g. a default system prompt)")
    return parts


def _with_default_system(tokenizer: Any, parts: TemplateParts) -> TemplateParts:
    """`parts` with the template's default system prompt, if a conversation without a system message renders as one
    with a system message (the default's text) before it."""
    text = _render(tokenizer, [{"role": "user", "content": _MARK["user"]}])
    before, after = parts.wrap["system"]
    head = parts.start + before
    bos = _added_bos(tokenizer)
    if bos and text.startswith(bos) and not head.startswith(bos):
        text = text[len(bos):]
    if not after or not text.startswith(head) or after not in text[len(head):]:
        return parts
    default = text[len(head):].split(after, 1)[0]
    if not default or _MARK["user"] in default:
        return parts
    return TemplateParts(wrap=parts.wrap, generation_prompt=parts.generation_prompt, start=parts.start,
                         default_system=default)


def _added_bos(tokenizer: Any) -> str | None:
    """The bos token when the tokenizer puts it before every text (llama.cpp then adds it too), else None. ChatML
    tokenizers whose bos token is `<|im_start|>` do not add it: their renderings keep it."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer("a")["input_ids"]
    return bos if bos and ids and ids[0] == tokenizer.bos_token_id else None


def _leading_bos(tokenizer: Any, probe: list[dict[str, str]]) -> str:
    """The bos token when the template writes it before any message (Llama 3's `{{ bos_token }}`), else ""."""
    bos = getattr(tokenizer, "bos_token", None)
    try:
        alone = [_render(tokenizer, [message]) for message in probe[:2]]
    except Exception:  # a template that refuses a system message alone
        return ""
    return bos if bos and all(text.startswith(bos) for text in alone) else ""


def _quote(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise Untranslatable("the template's fixed text contains '{{' or '\"\"\"'")
    return text


def go_template(parts: TemplateParts) -> str:
    """The Ollama TEMPLATE: each message wrapped by role, the generation prompt after a last non-assistant message.
    Written without `{{-` trimming, so the newlines of the fixed text survive."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_quote(parts.wrap[role][0])}{{{{ .Content }}}}'
        f"{_quote(parts.wrap[role][1])}" for i, role in enumerate(ROLES))
    return (f"{_quote(parts.start)}{{{{ range $i, $_ := .Messages }}}}"
            "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{_quote(parts.generation_prompt)}{{{{ end }}}}{{{{ end }}}}')


def modelfile(gguf_name: str, parts: TemplateParts, stops: list[str], system: str | None = None) -> str:
    """The Modelfile text: FROM the GGUF file beside it, TEMPLATE, stop parameters, SYSTEM when given (else the
    template's default system prompt, which the template itself would have put there)."""
    system = system if system is not None else parts.default_system
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(parts)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines.append(f'SYSTEM """{_quote(system)}"""')
    return "\n".join(lines) + "\n"
