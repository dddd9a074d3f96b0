"""The tokenizer as llama.cpp reads it from a GGUF file: tokens, their types, merges, the pre-tokenizer, special ids,
whether a bos token starts each text, and the chat template.

Two kinds of tokenizer are written:

* byte-level BPE (GPT-2 style: the project's tiny model, Llama 3, Qwen2/2.5/3), llama.cpp's `gpt2` model. llama.cpp
  splits text before BPE with a regular expression it picks by name (`tokenizer.ggml.pre`); the name is chosen here
  by recognising the pre-tokenizer of `tokenizer.json`.
* SentencePiece-style BPE with byte fallback (Mistral, Gemma 2, Phi-3, Llama 2, as transformers saves them: `▁` for
  spaces, `<0xNN>` pieces for bytes), llama.cpp's `llama` (SPM) model. llama.cpp merges the adjacent pair whose
  merged piece has the highest score; transformers' conversion ranks the merges by the merged piece's SentencePiece
  score, which also orders the ids, so score = -id reproduces the merge order. `tokenizer.ggml.add_space_prefix`
  says whether text after the start or a special token gets a leading `▁`: llama.cpp does that after every special
  token, as a `Prepend("▁")` normalizer does (the "legacy" behaviour of Llama 2, Mistral and Phi-3); Gemma adds no
  prefix. A Metaspace pre-tokenizer with `prepend_scheme: first` prefixes only the first text, which llama.cpp
  cannot do, and is refused.

A tokenizer we do not recognise is refused rather than guessed. Whether the choice was right is not taken on
trust: the export's verification compares llama.cpp's token ids with the trained tokenizer's on every verification
conversation.
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
    model: str = "gpt2"  # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece style)
    scores: list[float] | None = None  # llama: the merge priority of each piece
    add_space_prefix: bool = False  # llama: a `▁` before text at the start and after each special token
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/pad/unk -> id
    add_bos: bool = False
    chat_template: str | None = None


def _load_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FinetuneError(f"{path} is missing: GGUF export needs the fast tokenizer's tokenizer.json (saved with "
                            "every run by `ft train`)")
    return json.loads(path.read_text(encoding="utf-8"))


_HINT = ("GGUF export writes byte-level BPE tokenizers (GPT-2 style, Llama 3, Qwen2/2.5/3) and SentencePiece-style "
         "BPE with byte fallback (Mistral, Gemma 2, Phi-3, Llama 2); export with --format merged and convert that "
         "folder with llama.cpp's own tools")


def _is_space_replace(step: dict[str, Any]) -> bool:
    return step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == "▁"


def spm_space_prefix(data: dict[str, Any], where: str) -> bool:
    """Whether a SentencePiece-style `tokenizer.json` puts `▁` before each text (llama.cpp's add_space_prefix), or a
    refusal when it does something llama.cpp cannot reproduce (see the module docstring)."""
    norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [s.get("type") for s in steps]
    if not pre and kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == "▁" and _is_space_replace(steps[1]):
        return True
    if not pre and kinds == ["Replace"] and _is_space_replace(steps[0]):
        return False
    if not norm and pre.get("type") == "Metaspace" and pre.get("replacement", "▁") == "▁":
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        if scheme in ("always", "never") and not pre.get("split", True):
            return scheme == "always"
        raise FinetuneError(f"{where}: a Metaspace pre-tokenizer with prepend_scheme '{scheme}'"
                            + (" that splits at spaces" if pre.get("split", True) else "")
                            + " puts the space marker where llama.cpp's SentencePiece tokenizer does not (llama.cpp "
                            "adds it at the start and after every special token), so llama.cpp's token ids would "
                            f"differ. {_HINT}")
    raise FinetuneError(f"{where}: a SentencePiece-style tokenizer with normalizer {json.dumps(norm)[:160]} and "
                        f"pre-tokenizer {json.dumps(pre)[:160]} is not one llama.cpp is known to reproduce. {_HINT}")


def tokenizer_model(data: dict[str, Any], where: str) -> str:
    """`gpt2` or `llama`: which llama.cpp tokenizer model writes this `tokenizer.json` (or a refusal saying why)."""
    model = data.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        spm_space_prefix(data, where)
        return "llama"
    pre_tokenizer_name(data, where)
    return "gpt2"


def pre_tokenizer_name(data: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE `tokenizer.json`, or a refusal saying why."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    hint = _HINT
    if model.get("type") != "BPE":
        raise FinetuneError(f"{where}: a {model.get('type')} tokenizer is not written to GGUF here. {hint}")
    # NFC (Qwen2/2.5 as transformers 5 loads them) changes no text already in NFC, which llama.cpp's own conversion
    # assumes too; the check compares llama.cpp's token ids with ours on every verification text
    if data.get("normalizer") and data["normalizer"].get("type") != "NFC":
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
    tokenizer_model(_load_json(folder), str(folder / "tokenizer.json"))


def build_vocab(tokenizer: Any, folder: Path, vocab_size: int, end_of_turn_id: int | None = None) -> Vocab:
    """The GGUF vocabulary of the tokenizer saved in `folder`, padded to the model's `vocab_size` rows."""
    import gguf

    data = _load_json(folder)
    where = str(folder / "tokenizer.json")
    spm = tokenizer_model(data, where) == "llama"
    pre = "default" if spm else pre_tokenizer_name(data, where)
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in data["model"]["vocab"].items()}
    if spm:  # byte pieces and the unknown piece have their own types in llama.cpp's SentencePiece tokenizer
        for t, i in data["model"]["vocab"].items():
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                by_id[i] = (t, gguf.TokenType.BYTE)
            elif t == data["model"].get("unk_token"):
                by_id[i] = (t, gguf.TokenType.UNKNOWN)
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
    merges = [] if spm else [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    special = {"eos": tokenizer.eos_token_id}
    for name in ("bos", "pad", "unk"):
        if getattr(tokenizer, f"{name}_token_id", None) is not None:
            special[name] = getattr(tokenizer, f"{name}_token_id")
    if end_of_turn_id is not None and end_of_turn_id != tokenizer.eos_token_id:
        special["eot"] = end_of_turn_id
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    vocab = Vocab(pre=pre, tokens=tokens, types=types, merges=merges, special=special, add_bos=add_bos,
                  chat_template=gguf_chat_template(tokenizer.chat_template))
    if spm:
        vocab.model, vocab.add_space_prefix = "llama", spm_space_prefix(data, where)
        vocab.scores = [-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)]
    return vocab


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """The tokenizer keys of a GGUF file."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "llama":
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:
        writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
