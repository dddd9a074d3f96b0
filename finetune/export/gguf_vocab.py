"""The tokenizer as llama.cpp reads it from a GGUF file: tokens, their types, merges, the pre-tokenizer, special ids,
whether a bos token starts each text, and the chat template.

Only byte-level BPE tokenizers (GPT-2 style: the project's tiny model, Llama 3, Qwen2/2.5/3) are written. llama.cpp
splits text before BPE with a regular expression it picks by name (`tokenizer.ggml.pre`); the name is chosen here
by recognising the pre-tokenizer of `tokenizer.json`, and a tokenizer we do not recognise is refused rather than
guessed. Whether the choice was right is not taken on trust: the export's verification compares llama.cpp's token
ids with the trained tokenizer's on every verification conversation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

# Split regexes of byte-level BPE tokenizers and the llama.cpp pre-tokenizer that implements each.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


@dataclass
class Vocab:
    """What the GGUF file says about the tokenizer."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/pad/unk -> id
    add_bos: bool = False
    chat_template: str | None = None


def _load_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FinetuneError(f"{path} is missing: GGUF export needs the fast tokenizer's tokenizer.json (saved with "
                            "every run by `ft train`)")
    return json.loads(path.read_text(encoding="utf-8"))


def pre_tokenizer_name(data: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE `tokenizer.json`, or a refusal saying why."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    hint = ("GGUF export writes byte-level BPE tokenizers (GPT-2 style, Llama 3, Qwen2/2.5/3) only; export with "
            "--format merged and convert that folder with llama.cpp's own tools")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FinetuneError(f"{where}: a {model.get('type')} tokenizer"
                            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
                            + f" is not written to GGUF here. {hint}")
    if data.get("normalizer"):
        raise FinetuneError(f"{where}: tokenizers with a normalizer ({data['normalizer'].get('type')}) are not "
                            f"written to GGUF here. {hint}")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(splits) == 1 and len(steps) == 2 and byte_level and not byte_level[0].get("use_regex", True):
        if splits[0] in KNOWN_SPLITS:
            return KNOWN_SPLITS[splits[0]]
    raise FinetuneError(f"{where}: its pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp is known to "
                        f"reproduce. {hint}")


def gguf_chat_template(template: str) -> str:
    """The chat template without transformers' `{% generation %}` markers (used for training labels only, and
    unknown to other Jinja engines). Each marker becomes an always-true `if` with the same whitespace control, so
    the text it renders is unchanged."""
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


def check_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Refuse, before any model loads, a tokenizer the GGUF file could not carry faithfully."""
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(f"{folder}: the tokenizer has no chat template, so llama.cpp and Ollama would not know "
                            "how to format a conversation. Set data.template in the recipe and train again, or "
                            "export with --format merged")
    if tokenizer.eos_token_id is None:
        raise FinetuneError(f"{folder}: the tokenizer has no eos token: generation in llama.cpp would never stop")
    pre_tokenizer_name(_load_json(folder), str(folder / "tokenizer.json"))


def build_vocab(tokenizer: Any, folder: Path, vocab_size: int, end_of_turn_id: int | None = None) -> Vocab:
    """The GGUF vocabulary of the tokenizer saved in `folder`, padded to the model's `vocab_size` rows."""
    import gguf

    data = _load_json(folder)
    pre = pre_tokenizer_name(data, str(folder / "tokenizer.json"))
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise FinetuneError(f"{folder}: the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} "
                            "embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):  # rows the tokenizer never produces get placeholder names
        token, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    special = {"eos": tokenizer.eos_token_id}
    for name in ("bos", "pad", "unk"):
        if getattr(tokenizer, f"{name}_token_id", None) is not None:
            special[name] = getattr(tokenizer, f"{name}_token_id")
    if end_of_turn_id is not None and end_of_turn_id != tokenizer.eos_token_id:
        special["eot"] = end_of_turn_id
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    return Vocab(pre=pre, tokens=tokens, types=types, merges=merges, special=special, add_bos=add_bos,
                 chat_template=gguf_chat_template(tokenizer.chat_template))


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """The tokenizer keys of a GGUF file."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
