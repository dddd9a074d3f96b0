"""Tiny word-level chat tokenizers, built offline in milliseconds from a list of tokens.

The tests' character-level model (`tests/tinymodels.py`) and the benchmark's 32k-word model
(`scripts/bench_assets.py`) share this: the same special tokens (pad distinct from eos), and a ChatML template whose
assistant turns, `<|im_end|>` included, sit inside `{% generation %}` markers, so that our prefix masking and trl's
`assistant_only_loss` label exactly the same tokens. The template writes no newline between turns (Jinja trims the
one after a block tag); the registry's `chatml` template (`finetune.data.templates`) keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0-4, in this order
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_level_chat_tokenizer(tokens: Sequence[str], pre_tokenizer: Any, decoder: Any):
    """A `PreTrainedTokenizerFast` over `SPECIAL + tokens` (ids in that order) with the ChatML template above.

    Args:
        tokens: the ordinary tokens, after the special ones.
        pre_tokenizer: how text splits into tokens (a `tokenizers.pre_tokenizers` object).
        decoder: how tokens join back into text (a `tokenizers.decoders` object).
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *tokens])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    tok.chat_template = CHATML
    return tok
