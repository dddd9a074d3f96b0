"""Chat templates: the small registry the project keeps, and `apply_template`, which puts the recipe's template on
the tokenizer.

The registry templates are written for training: every assistant turn sits inside `{% generation %}` markers, ends
with its end-of-turn token, and a conversation renders prefix by prefix (rendering the first k messages gives the
start of rendering all of them), which is what the label masks rely on. This module imports nothing heavy, so
`ft validate` can use `TEMPLATE_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.special_text import Specials
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig


@dataclass(frozen=True)
class RegistryTemplate:
    """A template of the registry and the special tokens it needs."""

    jinja: str
    tokens: tuple[str, ...]  # special tokens the text uses (added to the tokenizer when missing)
    end_of_turn: str | None  # token that closes an assistant turn; None: the tokenizer's eos token


def _nl(text: str) -> str:
    # Jinja in transformers trims the newline after a block tag, so literal newlines go through expressions
    # (inside a tag, write the escape '\\n' instead).
    return text.replace("\n", "{{ '\\n' }}")


_CHATML = _nl(
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA3 = _nl(
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Mistral and Gemma have no system role: the system text goes in front of the first user turn (not the last one,
# as some published templates do, which would break rendering prefix by prefix).
_MISTRAL = _nl(
    "{% if bos_token %}{{ bos_token }}{% endif %}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }} [/INST]{% set ns.system = '' %}"
    "{% else %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)

_GEMMA = _nl(
    "{% if bos_token %}{{ bos_token }}{% endif %}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'assistant' %}<start_of_turn>model\n"
    "{% generation %}{{ m['content'] | trim }}<end_of_turn>{% endgeneration %}\n"
    "{% else %}<start_of_turn>{{ m['role'] }}\n{{ ns.system }}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_PHI3 = _nl(
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# For base models without a template whose vocabulary lacks chat tokens: plain-text role headers, the eos token
# ends each assistant turn, so no token has to be added (added tokens start with untrained embeddings).
_PLAIN = _nl(
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Assistant:\n{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n\n{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

REGISTRY: dict[str, RegistryTemplate] = {
    "chatml": RegistryTemplate(_CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama-3": RegistryTemplate(_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "mistral": RegistryTemplate(_MISTRAL, (), None),
    "gemma": RegistryTemplate(_GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    "phi-3": RegistryTemplate(_PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    "plain": RegistryTemplate(_PLAIN, (), None),
}
TEMPLATE_NAMES = {"tokenizer", *REGISTRY}


def template_tokens(name: str) -> tuple[str, ...]:
    """The special tokens a registry template adds to a tokenizer that lacks them (none for other templates)."""
    return REGISTRY[name].tokens if name in REGISTRY else ()


@dataclass
class TemplateInfo:
    """What `apply_template` did: which template is on the tokenizer and which token ends an assistant turn."""

    source: str  # "tokenizer", a registry name, or the Jinja file's path
    end_of_turn: str | None
    end_of_turn_id: int | None
    notices: list[str] = field(default_factory=list)
    specials: Any = None  # special_text.Specials of the tokenizer (found once here, not per row)


def _vocab_has(tokenizer: Any, token: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(token)
    return isinstance(tid, int) and tid != tokenizer.unk_token_id


def _requested(tokenizer: Any, template: str) -> tuple[str, str, RegistryTemplate | None, list[str]]:
    """(source, jinja text, registry entry or None, notices) for the recipe's `data.template` value."""
    if template == "tokenizer":
        if tokenizer.chat_template:
            return "tokenizer", tokenizer.chat_template, None, []
        name = "chatml" if all(_vocab_has(tokenizer, t) for t in REGISTRY["chatml"].tokens) else "plain"
        notice = (f"the tokenizer has no chat template (a base model?); using the '{name}' template. Set "
                  "data.template to a registry name (chatml, llama-3, mistral, gemma, phi-3, plain) or a Jinja file "
                  "to choose another.")
        return name, REGISTRY[name].jinja, REGISTRY[name], [notice]
    if template in REGISTRY:
        return template, REGISTRY[template].jinja, REGISTRY[template], []
    path = Path(template)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FinetuneError(
            f"data.template: '{template}' is neither a template name ({', '.join(sorted(TEMPLATE_NAMES))}) nor a "
            f"readable Jinja file ({e.__class__.__name__}: {e})"
        ) from None
    if not text.strip():
        raise FinetuneError(f"data.template: the Jinja file '{template}' is empty")
    return str(path), text, None, []


def apply_template(tokenizer: Any, data: DataConfig | str) -> TemplateInfo:
    """Put the recipe's chat template (`data.template`) on the tokenizer, in place, and report what was done.

    `tokenizer` keeps the tokenizer's own template; a base model without one gets `chatml` (when its vocabulary has
    the ChatML tokens) or `plain`, with a notice. A registry template gets its special tokens added when missing
    (the embeddings are then resized when the model loads) and the tokenizer's eos set to its end-of-turn token, so
    generation stops where the template ends a turn. Calling it again with the same template changes nothing.

    Args:
        tokenizer: A transformers tokenizer; modified in place.
        data: The stage's data section (its `template` key is used), or a `data.template` value.

    Returns:
        The template source, its end-of-turn token and id, and notices for the user (already printed).

    Raises:
        FinetuneError: The template file is unreadable, or the template cannot render a simple conversation.
    """
    template = data if isinstance(data, str) else data.template
    source, text, entry, notices = _requested(tokenizer, template)
    if entry is not None:
        missing = [t for t in entry.tokens if not _vocab_has(tokenizer, t)]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            notices.append(
                f"template '{source}': added the tokens {', '.join(missing)} to the tokenizer. Their embeddings start "
                "untrained; add embed_tokens and lm_head to lora.modules_to_save so the model can learn them."
            )
        eot = entry.end_of_turn or tokenizer.eos_token
        if eot is None:
            raise FinetuneError(f"template '{source}' ends assistant turns with the eos token, but the tokenizer has "
                                "none; pick a template with its own end-of-turn token (chatml, llama-3, gemma, phi-3)")
        if tokenizer.eos_token != eot:
            notices.append(f"template '{source}': eos token set to {eot} (was {tokenizer.eos_token}) so generation "
                           "stops at the end of an assistant turn")
            tokenizer.eos_token = eot
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise FinetuneError(f"template '{source}': the pad token {tokenizer.pad_token} is the end-of-turn token; "
                                "padding would mask it and the model would never learn to stop")
    if tokenizer.chat_template != text:
        tokenizer.chat_template = text
    eot = find_end_of_turn(tokenizer, source)
    for notice in notices:
        print(f"data: {notice}", flush=True)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot is not None else None
    return TemplateInfo(source=source, end_of_turn=eot, end_of_turn_id=eot_id, notices=notices,
                        specials=Specials.of(tokenizer))


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template's text for `messages` (no tokenization); `tools` (JSON schemas) go to the template."""
    if tools:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def answer_text(tokenizer: Any, prompt: list[dict[str, str]], answer: list[dict[str, str]],
                end_of_turn: str | None) -> tuple[str, str]:
    """(the prompt's text with the generation prompt, the answer's text after it), the answer cut right after its
    end-of-turn token: what generation produces, without the separator a template writes between turns (ChatML's
    newline), which no trained label covers and which a sampled answer never contains."""
    head = render(tokenizer, prompt, generation_prompt=True)
    full = render(tokenizer, prompt + answer)
    text = full[len(head):] if full.startswith(head) else full
    cut = text.find(end_of_turn) if end_of_turn else -1
    return head, (text[: cut + len(end_of_turn)] if end_of_turn and cut >= 0 else text)


def find_end_of_turn(tokenizer: Any, source: str) -> str | None:
    """The special token the template puts right after an assistant message's content, or None if there is none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    try:
        head = render(tokenizer, probe[:1], generation_prompt=True)
        full = render(tokenizer, probe)
    except Exception as e:  # jinja errors come in many classes; the message is what the user needs
        raise FinetuneError(f"chat template '{source}' cannot render a simple user/assistant exchange: {e}") from None
    if not full.startswith(head) or "Yes" not in full[len(head):]:
        return None
    after = full[len(head) + full[len(head):].index("Yes") + 3 :]
    specials = {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [(after.find(t), t) for t in specials if t and after.find(t) >= 0]
    return min(found)[1] if found else None


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops at: eos, and the chat template's end-of-turn token where it is another one (Gemma's
    tokenizers keep `<eos>` as eos while turns end with `<end_of_turn>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        try:
            eot = find_end_of_turn(tokenizer, "tokenizer")
        except FinetuneError:
            eot = None
        if eot is not None:
            ids.append(tokenizer.convert_tokens_to_ids(eot))
    return list(dict.fromkeys(ids))


def applied_template(tokenizer: Any, data: DataConfig) -> TemplateInfo:
    """The template of a tokenizer that `apply_template(tokenizer, data)` has prepared.

    Raises:
        FinetuneError: The tokenizer does not carry the template the recipe asks for (apply_template was not called:
            a programming error in the stage, reported loudly rather than training on the wrong template).
    """
    if tokenizer.chat_template:
        source, text, _, _ = _requested(tokenizer, data.template)
        if tokenizer.chat_template == text:
            eot = find_end_of_turn(tokenizer, source)
            return TemplateInfo(source, eot, tokenizer.convert_tokens_to_ids(eot) if eot is not None else None,
                                specials=Specials.of(tokenizer))
    raise FinetuneError(f"the tokenizer does not carry the chat template data.template '{data.template}' asks for; "
                        "call finetune.data.apply_template(tokenizer, data) before building the dataset")
