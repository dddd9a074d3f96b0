"""Replay rows for the real-model SFT (`recipes/smollm2/`): the base model's own answers to everyday questions, so that
training on arithmetic answered with a bare number does not teach it to end every turn early.

Why: the SFT rows all end with a number and the end-of-turn token. After one epoch the tuned model puts about eight
times the base's probability on `<|im_end|>` in running prose, mostly right after a full stop, and that is where most
of its loss change on Python's documentation (the forgetting measure) comes from. Rows where the base answers at
length keep that behaviour where it was: their loss is near zero for the base, so they only pull back what drifts.

The questions are everyday topics (animals, places, food, crafts, nature), composed here from templates: nothing about
programming or Python, whose documentation is the forgetting text. The answers are the base model's own samples
(temperature 1; 4-bit NF4 base, as the SFT trains on it), cut at `--max-new-tokens`; a cut answer is longer than
`data.max_length` once rendered, so its end-of-turn token is truncated away rather than learnt after a cut.

Usage (needs the model: `make real-model`)::

    python scripts/make_replay_data.py                      # writes data/smollm2/replay_train.jsonl
    python scripts/make_replay_data.py --rows 64 --out DIR

Seeded sampling on the CPU: the same installed versions give the same file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SEED = 2026
RECIPE = "recipes/smollm2/sft.yaml"

TOPICS = [
    "elephants", "honey bees", "owls", "dolphins", "penguins", "wolves", "octopuses", "butterflies", "horses",
    "the Sahara desert", "the Amazon rainforest", "the Alps", "Iceland", "Japan", "Morocco", "New Zealand",
    "Venice", "the Nile", "volcanoes", "glaciers", "thunderstorms", "rainbows", "the Moon", "tides", "coral reefs",
    "bread baking", "making soup", "tea", "coffee", "olive oil", "cheese", "rice", "apples", "chocolate",
    "gardening", "knitting", "pottery", "photography", "hiking", "swimming", "chess", "painting with watercolors",
    "learning a new language", "keeping a journal", "sleep", "a morning walk", "libraries", "museums", "bicycles",
    "sailing", "trains", "lighthouses", "castles", "markets", "festivals", "friendship", "the seasons", "autumn",
]
TEMPLATES = [
    "Tell me about {t}.", "What is interesting about {t}?", "Describe {t} in a few sentences.",
    "Why do people like {t}?", "Write a short paragraph about {t}.", "What should a beginner know about {t}?",
    "Give me three facts about {t}.", "Explain {t} to a child.",
]


def questions(n: int, seed: int = SEED) -> list[str]:
    """`n` distinct everyday questions (topic x phrasing), in a seeded order."""
    pairs = list(itertools.product(TOPICS, TEMPLATES))
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise SystemExit(f"--rows {n}: at most {len(pairs)} distinct questions")
    return [template.format(t=topic) for topic, template in pairs[:n]]


def sample_answers(model, tokenizer, asked: list[str], max_new_tokens: int, batch_size: int = 24) -> list[str]:
    """The model's answers sampled at temperature 1 (no top-k, no top-p): draws from its own distribution, whose
    expected gradient at the base is zero. Greedy answers are its mode instead: training on them sharpens the model
    and raised the forgetting (bench/real-model.md)."""
    import torch

    from finetune.data.templates import stop_ids

    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(asked), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in asked[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer))
        out += [t.strip() for t in tokenizer.batch_decode(new[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        print(f"{len(out)}/{len(asked)} answers", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--recipe", default=RECIPE, help="the recipe whose base, quantization and template answer")
    parser.add_argument("--out", default="data/smollm2/replay_train.jsonl")
    args = parser.parse_args(argv)

    import torch

    from finetune.model.loading import load_model, load_tokenizer
    from finetune.recipe.schema import load_recipe

    torch.manual_seed(SEED)
    recipe = load_recipe(args.recipe)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe, tokenizer=tokenizer).eval()
    asked = questions(args.rows)
    answers = sample_answers(model, tokenizer, asked, args.max_new_tokens)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(asked, answers, strict=True) if a]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
