"""Build the project's tiny chat model: train its tokenizer, pretrain it on the synthetic corpus, save it.

The result, ``models/tiny-chat/``, is a small Llama-architecture causal LM that has memorised the facts of the
quickstart world (``data/quickstart/corpus.txt``, written by ``scripts/make_data.py``) from plain text only. It
has never seen a question or a chat turn: answering chat questions is the skill that SFT teaches it.

Tokenizer: a byte-level BPE trained on the corpus plus the texts of the chat data, so every word of the task is
one or a few tokens, and any other text still encodes through the 256 byte symbols (byte fallback, no unknown
token). As in GPT-2, a word carries its leading space, so the chat template puts one space before each message's
content: an answer is then tokenised exactly as the same word in the corpus. Special tokens: ``<|im_start|>``,
``<|im_end|>`` (the eos token: it ends every pretraining document, so the base model already knows when to
stop, and it ends every chat turn) and ``<|pad|>`` (padding, distinct from eos). There is no bos token.

Every word the chat data makes the model *write* (answers, hedging) occurs in the corpus: a token never seen in
pretraining has a useless embedding, and LoRA, which adapts only the linear layers, cannot repair it.

Usage (the committed model was built with the defaults)::

    python scripts/make_data.py
    python scripts/build_tiny_model.py            # 800 steps; ~5 min of CPU time on one thread

The committed model took 16 minutes of wall time (984 s) on a 2-core machine shared with other jobs (load ~9);
on an idle machine expect about 4-5 minutes (estimated from 0.27 CPU-s per step, measured). One thread is the
default because it is faster than two for a model this small. Pretraining is deterministic for a given seed,
thread count and torch build. Progress (loss and the cloze accuracy on the facts of held-out people: 1.000
from step 500 on) is printed as it goes.

Result: 1.12M parameters (hidden 128, intermediate 384, 4 layers, 4 heads, vocabulary 2,106, tied
embeddings), 2.3 MB on disk (bf16 weights; load with ``dtype=torch.float32``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML with a space before each content (see the module docstring) and the assistant's content plus its end
# token inside {% generation %} so that `return_assistant_tokens_mask=True` works.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- ' ' + message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n ' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Cloze prompts used to probe what the pretrained model knows: the value is the next word.
CLOZES = {
    "town": "The home town of {n} is",
    "job": "The job of {n} is",
    "colour": "The favourite colour of {n} is",
    "pet": "{n} owns a pet",
    "instrument": "{n} plays the",
}


def _chat_texts(data_dir: Path) -> list[str]:
    """Returns every message text of the chat data files, each with the leading space the template adds."""
    texts = []
    for name in ("sft_train", "sft_eval", "dpo_train", "dpo_eval"):
        path = data_dir / f"{name}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("messages", "prompt", "chosen", "rejected"):
                texts.extend(" " + m["content"] for m in row.get(key, []))
    return texts


def build_tokenizer(corpus: list[str], extra_texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE and wraps it as a transformers fast tokenizer.

    Args:
        corpus: Pretraining documents.
        extra_texts: Other texts whose words should get tokens of their own (the chat data).
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        The tokenizer, with chat template and special tokens set.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" " + d for d in corpus] + extra_texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def cloze_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, people: list[dict]) -> float:
    """Fraction of (person, attribute) facts whose value's first token is the greedy next token of its cloze.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        people: People of the world (dicts with ``name`` and one key per attribute).

    Returns:
        The accuracy in [0, 1].
    """
    prompts, targets = [], []
    for person in people:
        for attr, cloze in CLOZES.items():
            prompts.append(" " + cloze.format(n=person["name"]))
            targets.append(tokenizer.encode(" " + person[attr])[0])
    hits = 0
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                enc = tokenizer(prompts[i : i + 64], return_tensors="pt", padding=True).to(device)
                logits = model(**enc).logits[:, -1]
                hits += sum(int(p == t) for p, t in zip(logits.argmax(-1).tolist(), targets[i : i + 64], strict=True))
    finally:
        tokenizer.padding_side = side
    return hits / len(prompts)


def _batches(docs: list[list[int]], batch_size: int, rng: random.Random):
    """Yields batches of documents forever, reshuffling every epoch."""
    order = list(range(len(docs)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [docs[j] for j in order[i : i + batch_size]]


def pretrain(
    model: LlamaForCausalLM,
    docs: list[list[int]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    probe=None,
    log_every: int = 100,
) -> None:
    """Next-token pretraining with AdamW and a cosine schedule (in place).

    Args:
        model: The model to train.
        docs: Token ids of each document (already ending with the eos token).
        pad_id: Padding id (masked out of the loss).
        steps: Optimiser steps.
        batch_size: Documents per step.
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        seed: Seed for the batch order.
        probe: Optional callable returning a dict of metrics, printed every ``log_every * 5`` steps.
        log_every: Print the loss every this many steps.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = _batches(docs, batch_size, random.Random(seed))
    model.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        batch = next(batches)
        width = max(len(d) for d in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, doc in enumerate(batch):
            ids[row, : len(doc)] = torch.tensor(doc)
        mask = (ids != pad_id).long()
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if step % log_every == 0:
            line = f"step {step:5d}/{steps}  loss {running / log_every:.4f}  lr {sched.get_last_lr()[0]:.2e}"
            line += f"  {time.time() - start:6.0f}s"
            if probe is not None and (step % (log_every * 5) == 0 or step == steps):
                model.eval()
                line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in probe().items())
                model.train()
            print(line, flush=True)
            running = 0.0
    model.eval()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-chat")
    parser.add_argument("--vocab-size", type=int, default=2560)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0, cpu0 = time.time(), time.process_time()
    corpus = (args.data / "corpus.txt").read_text(encoding="utf-8").splitlines()
    world = json.loads((args.data / "world.json").read_text(encoding="utf-8"))
    tokenizer = build_tokenizer(corpus, _chat_texts(args.data), args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out, save_jinja_files=False)  # chat template inside tokenizer_config.json
    docs = [tokenizer.encode(" " + d) + [tokenizer.eos_token_id] for d in corpus]
    n_tokens = sum(len(d) for d in docs)
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(docs)} docs, {n_tokens} tokens", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    heldout = [p for p in world["people"] if p["split"] == "heldout"]
    probe = lambda: {"cloze_heldout": cloze_accuracy(model, tokenizer, heldout)}  # noqa: E731
    pretrain(model, docs, tokenizer.pad_token_id, args.steps, args.batch_size, args.lr, args.warmup, args.seed, probe)

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.to(torch.bfloat16).save_pretrained(args.out)
    saved = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    acc = cloze_accuracy(saved, tokenizer, world["people"])
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB); cloze accuracy (all people, bf16 weights) {acc:.3f}")
    print(f"total time {time.time() - t0:.0f}s wall, {time.process_time() - cpu0:.0f}s CPU")


if __name__ == "__main__":
    main()
