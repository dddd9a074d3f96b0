"""A tiny SentencePiece-style tokenizer, built offline in about a second, shaped like those of Mistral, Gemma and
Phi-3 as transformers saves them: a `tokenizer.json` BPE model with byte fallback (`<0x00>`..`<0xFF>` pieces for
characters outside the vocabulary), `▁` for spaces, pieces ordered by score with the merges SentencePiece's scores
imply (every split of a piece into two pieces, ranked by the piece), and `<unk>`, `<s>`, `</s>` as ids 0-2.

`space_prefix`: `legacy` (a `Prepend("▁")` normalizer: every text between special tokens starts with a space, like
Llama 2, Mistral v0.1 and Phi-3), `first` (a Metaspace pre-tokenizer that prepends to the first text only, like
newer conversions) or `none` (no prefix, like Gemma). `chat`: `phi3` (`<|user|>`, `<|assistant|>`, `<|end|>`; as in
Phi-3's tokenizer, these chat tokens and `</s>` strip the whitespace after them, which llama.cpp reproduces for
the phi3 architecture only), `mistral` (`[INST]`, `[/INST]`, answers ended by `</s>`) or `gemma` (`<start_of_turn>`,
`<end_of_turn>`).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHAT = {
    "phi3": (["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
             "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "<|end|>"),
    "mistral": (["<pad>", "[INST]", "[/INST]"],
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}", "</s>"),
    "gemma": (["<pad>", "<start_of_turn>", "<end_of_turn>"],
              "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "<end_of_turn>"),
}


def _corpus(limit: int = 3000) -> list[str]:
    texts = []
    with (ROOT / "data" / "quickstart" / "sft_train.jsonl").open() as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
            if len(texts) >= limit:
                break
    return texts


def build_spm_tokenizer(out: Path, vocab_size: int = 700, space_prefix: str = "legacy", chat: str = "phi3"):
    """Train, save under `out` and return a `PreTrainedTokenizerFast` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # 1. a vocabulary: BPE learnt on the quickstart texts, words split at spaces as SentencePiece does
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    learner.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                               special_tokens=["<unk>", "<s>", "</s>"]))
    learnt = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    pieces = ["<unk>", "<s>", "</s>", *BYTES] + [p for p, _ in learnt if p not in ("<unk>", "<s>", "</s>")]
    vocab = {p: i for i, p in enumerate(pieces)}
    # 2. merges as SentencePiece's scores imply them: every split of a piece into two pieces, by the piece's rank
    merges = [(p[:k], p[k:]) for p in pieces[3 + 256:] for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    if space_prefix == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif space_prefix == "first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix != "none" else []))
    specials, template, end_of_turn = CHAT[chat]
    strip = chat == "phi3"  # Phi-3: every chat token but <|endoftext|> eats the whitespace after it, and so does </s>
    added = [AddedToken(t, special=True, normalized=False, rstrip=strip and t != "<|endoftext|>") for t in specials]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token=AddedToken("</s>", special=True, normalized=False, rstrip=strip),
                                   additional_special_tokens=added, chat_template=template)
    fast.pad_token = specials[0]
    fast.eos_token = end_of_turn  # the end of an assistant turn ends generation, as in the families' chat models
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
