"""A model this project was not built around, and data in every format a new user brings, built by the tests.

`build_qwen2_model` writes a random 2-layer Qwen2 (biases on q/k/v, tied embeddings, as in Qwen2.5-0.5B) with its
own byte-level BPE tokenizer trained here on the test data, and a Qwen-style ChatML template without generation
markers: pad `<|endoftext|>`, eos `<|im_end|>` (instruct), or pad equal to eos (`<|endoftext|>`, as Qwen2 base
models ship). `write_format_data` writes the same small task as sharegpt jsonl, alpaca json, prompt/completion
parquet and preference jsonl. Nothing here uses the bundled model or `tests/tinymodels.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _pairs(n: int, offset: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) of the task: name the word of a digit."""
    rows = []
    for i in range(offset, offset + n):
        d = i % len(WORDS)
        rows.append((f"What is {d} in words?", WORDS[d], WORDS[(d + 3) % len(WORDS)]))
    return rows


def build_qwen2_model(out: Path, pad_is_eos: bool = False, seed: int = 0) -> Path:
    """Write a ChatML byte-level BPE tokenizer and a random tiny Qwen2 to `out` (safetensors) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [f"user\n{q}\nassistant\n{a}\n{b}\nsystem\nYou are helpful." for q, a, b in _pairs(64)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>" if pad_is_eos else "<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = QWEN_CHATML
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    cfg = Qwen2Config(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    return out


def write_format_data(folder: Path, n: int = 32) -> dict[str, Path]:
    """The task in four formats: `sharegpt` (jsonl), `alpaca` (json list), `parquet` (prompt/completion) and
    `preference` (jsonl with prompt, chosen, rejected)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = _pairs(n)
    paths = {name: folder / f"{name}.{ext}" for name, ext in
             (("sharegpt", "jsonl"), ("alpaca", "json"), ("parquet", "parquet"), ("preference", "jsonl"))}
    write_jsonl(paths["sharegpt"], [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                                    for q, a, _ in rows])
    paths["alpaca"].write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a, _ in rows]),
                               encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"prompt": q, "completion": a} for q, a, _ in rows]), paths["parquet"])
    write_jsonl(paths["preference"], [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in rows])
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
