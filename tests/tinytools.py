"""Tokenizers with tool-calling and reasoning chat templates, built by the tests offline from the bundled
character-level model (`tests/tinymodels.py`).

`build_tool_model(base, out, style)` copies the tiny model's folder and gives its tokenizer one of the templates in
`tests/templates/`: `qwen3` (ChatML, <tool_call> JSON, <tool_response> results, reasoning kept only after the last
user message; <think>, </think>, <tool_call>, </tool_call>, <tool_response>, </tool_response> added as single
ordinary tokens, as Qwen3's tokenizer has them) or `llama31` (header tokens, one JSON call per message, ipython
results, no reasoning field; the header tokens and <|eot_id|> added as special tokens, eos <|eot_id|>). The model's
embeddings are resized to the new vocabulary when it loads. Every other character stays one token, so expected
labels can be written out by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
QWEN3_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
LLAMA31_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tool_tokenizer(tok, style: str):
    """`tok` (the tiny character-level tokenizer) with the `style` template and its tokens, changed in place."""
    if style == "qwen3":
        tok.add_tokens(QWEN3_TOKENS, special_tokens=False)
        tok.chat_template = (TEMPLATES / "qwen3_tools.jinja").read_text(encoding="utf-8")
    elif style == "llama31":
        tok.add_tokens(LLAMA31_TOKENS, special_tokens=True)
        tok.eos_token = "<|eot_id|>"
        tok.chat_template = (TEMPLATES / "llama31_tools.jinja").read_text(encoding="utf-8")
    else:
        raise ValueError(f"unknown style {style}")
    return tok


def build_tool_model(base: Path, out: Path, style: str) -> Path:
    """Copy the model folder `base` to `out` with a `style` tool/reasoning tokenizer; return `out`."""
    from transformers import AutoTokenizer

    shutil.copytree(base, out, dirs_exist_ok=True)
    tool_tokenizer(AutoTokenizer.from_pretrained(str(base)), style).save_pretrained(str(out))
    return out
