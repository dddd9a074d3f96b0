"""Data for the real-model recipes (`recipes/smollm2/`): arithmetic answered in an exact format, and real English prose
for forgetting.

The task: questions such as "What is 47 + 38?" or "Compute 23 times 7." asked in a dozen phrasings, answered with the
number alone ("85"). SmolLM2-135M-Instruct, asked as it comes, answers in a sentence and often wrongly: exact match
near 0%. Held-out questions use operand pairs never seen in training. Files written to `data/smollm2/`:

* ``sft_train.jsonl`` / ``sft_eval.jsonl``: chat rows (``messages``, ``answer``, ``op``); eval rows are held out and
  double as ``task_eval`` (exact match of the greedy answer);
* ``sft_train_more.jsonl``: more training rows of the same kind, drawn after all the others (so every other file is
  the same with or without it), none sharing an operand pair with the held-out rows: more distinct questions for SFT;
* ``dpo_train.jsonl`` / ``dpo_eval.jsonl``: preference pairs, chosen the right number, rejected a near miss (a
  carry dropped or added, off by one): what an SFT model still gets wrong;
* ``grpo_train.jsonl``: prompts with their ``answer`` for GRPO's exact-match reward.

And ``data/general/pydoc.txt``: paragraphs of Python's own documentation (``pydoc_data.topics``, shipped with the
interpreter, PSF licence), one per line: real English prose, never trained on, for the loss change and KL against the
base model (forgetting).

Usage::

    python scripts/make_real_data.py              # writes data/smollm2/ and data/general/pydoc.txt
    python scripts/make_real_data.py --out DIR

A pure function of the seed: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 2026
N_TRAIN, N_EVAL, N_DPO_TRAIN, N_DPO_EVAL, N_GRPO = 2000, 200, 600, 100, 400
N_MORE = 4000  # sft_train_more.jsonl
N_PROSE = 120

PHRASINGS = {
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
          "{a} + {b} = ?", "What do you get when you add {a} to {b}?", "Calculate the sum of {a} and {b}.",
          "How much is {a} plus {b}?"],
    "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
          "{a} - {b} = ?", "How much is {a} minus {b}?", "Calculate the difference {a} - {b}.",
          "What do you get when you take {b} away from {a}?"],
    "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Compute {a} x {b}.", "Multiply {a} by {b}.",
          "{a} * {b} = ?", "How much is {a} times {b}?", "Calculate the product of {a} and {b}.",
          "What do you get when you multiply {a} by {b}?"],
}


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(11, 99), rng.randint(2, 9)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def _value(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_questions(seed: int = SEED, more: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out questions; no (a, op, b) of the held-out set appears in training.

    `more` training questions are drawn after the held-out ones and appended to the training list: the first
    rows, the held-out ones included, are the same whatever `more` is.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    rows = []
    first = N_TRAIN + N_EVAL + N_DPO_TRAIN + N_DPO_EVAL + N_GRPO
    while len(rows) < first + more:
        op = rng.choice("+-*")
        a, b = _operands(rng, op)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        question = rng.choice(PHRASINGS[op]).format(a=a, b=b)
        rows.append({"question": question, "answer": str(_value(a, b, op)), "op": op, "a": a, "b": b})
    cut = N_TRAIN + N_DPO_TRAIN + N_GRPO
    return rows[:cut] + rows[first:], rows[cut:first]


def _chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": row["answer"]}],
            "answer": row["answer"], "op": row["op"]}


def _near_miss(rng: random.Random, row: dict) -> str:
    """A plausible wrong answer: off by ten (a carry), by one, or digits swapped."""
    value = int(row["answer"])
    for _ in range(10):
        wrong = rng.choice([value + 10, value - 10, value + 1, value - 1, int(str(value)[::-1])])
        if wrong != value and wrong >= 0:
            return str(wrong)
    return str(value + 1)


def _pair(rng: random.Random, row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": row["question"]}],
            "chosen": [{"role": "assistant", "content": row["answer"]}],
            "rejected": [{"role": "assistant", "content": _near_miss(rng, row)}],
            "answer": row["answer"], "op": row["op"]}


def make_files(seed: int = SEED) -> dict[str, list[dict]]:
    train, held = make_questions(seed, more=N_MORE)
    rng = random.Random(seed + 1)
    cut = N_TRAIN + N_DPO_TRAIN + N_GRPO
    sft, dpo, grpo = train[:N_TRAIN], train[N_TRAIN:N_TRAIN + N_DPO_TRAIN], train[N_TRAIN + N_DPO_TRAIN:cut]
    return {
        "sft_train.jsonl": [_chat(r) for r in sft],
        "sft_eval.jsonl": [_chat(r) for r in held[:N_EVAL]],
        "sft_train_more.jsonl": [_chat(r) for r in train[cut:]],
        "dpo_train.jsonl": [_pair(rng, r) for r in dpo],
        "dpo_eval.jsonl": [_pair(rng, r) for r in held[N_EVAL:N_EVAL + N_DPO_EVAL]],
        "grpo_train.jsonl": [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"],
                              "op": r["op"]} for r in grpo],
    }


def prose(n: int = N_PROSE, seed: int = SEED) -> list[str]:
    """Paragraphs of Python's documentation (pydoc_data.topics): 300-900 characters of prose each, no code."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if not 300 <= len(text) <= 900 or text.startswith((">>>", "*", "|")):
                continue
            letters = sum(c.isalpha() or c == " " for c in text) / len(text)
            if letters > 0.93 and text[0].isupper() and text.endswith("."):  # sentences, not grammar or code
                paragraphs.append(text)
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    return sorted(paragraphs[:n], key=paragraphs.index)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="data folder (smollm2/ and general/ go under it)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    out = Path(args.out) / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_files(args.seed).items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} rows")
    general = Path(args.out) / "general" / "pydoc.txt"
    general.parent.mkdir(parents=True, exist_ok=True)
    general.write_text("".join(p + "\n" for p in prose(seed=args.seed)), encoding="utf-8")
    print(f"{general}: {N_PROSE} paragraphs of Python's documentation (pydoc_data.topics, PSF licence)")


if __name__ == "__main__":
    main()
