"""Tiny models and data the tests build themselves, in seconds, offline.

`build_char_model` makes a character-level tokenizer (`scripts/tiny_tokenizer.py`: ChatML, pad distinct from
eos) and a random 2-layer Llama; `write_addition_data` a small chat dataset (user asks for a sum, assistant answers).
"""

from __future__ import annotations

import json
from pathlib import Path


def build_char_model(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tokenizer + random Llama to `out` and return it."""
    import torch
    from tiny_tokenizer import SPECIAL, word_level_chat_tokenizer
    from tokenizers import decoders, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = word_level_chat_tokenizer(chars, pre_tokenizers.Split(pattern="", behavior="isolated"), decoders.Fuse())
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + len(chars),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def write_addition_data(path: Path, n: int = 64, offset: int = 0) -> Path:
    """Chat rows 'add a b' -> 'a+b' with an `answer` field, as jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            a, b = i % 8, (i * 3) % 8
            msgs = [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": msgs, "answer": str(a + b)}) + "\n")
    return path
