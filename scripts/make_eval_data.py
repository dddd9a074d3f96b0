"""Write the tiny model's extra evaluation files: general text for forgetting, multiple-choice questions.

``data/general/heldout.txt``, a small general-text held-out set for the forgetting check:

The tiny model (``models/tiny-chat``) knows one world: biographies of its people and everyday-language documents
(``data/quickstart/corpus.txt``). What a fine-tune can make it forget is that plain text. This file holds new
documents of both kinds, written by the same generators as the corpus (``scripts/make_data.py``) with another
seed: new paraphrase orders of the people's facts and new combinations of the everyday sentences, never as chat.
`eval.general_text` points at it; `ft eval` and training compare the tuned model's loss and next-token
distribution on it with the base model's.

``data/quickstart/choice_eval.jsonl``: questions about held-out people with four choices (the right value and three
other values of the same attribute) for `choice_accuracy`.

Usage::

    python scripts/make_eval_data.py          # a pure function of the seed: byte-identical on every run
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import make_data

ROOT = Path(__file__).resolve().parents[1]
SEED = 4321
N_BIOGRAPHIES = 40
N_EVERYDAY = 40
N_CHOICE = 100


def make_general_text(seed: int = SEED) -> list[str]:
    """Biographies of randomly chosen people and everyday-language documents, shuffled."""
    world = make_data.build_world(make_data.SEED)  # the same people as the committed corpus
    rng = random.Random(seed)
    docs = []
    for person in rng.sample(world["people"], N_BIOGRAPHIES):
        attrs = list(make_data.ATTRIBUTES)
        rng.shuffle(attrs)
        docs.append(" ".join(make_data._statement(rng, person, a) for a in attrs))
    for _ in range(N_EVERYDAY):
        sentences = rng.sample(make_data.FILLER, rng.randint(2, 4))
        docs.append(" ".join(make_data._filler(rng, world, s) for s in sentences))
    rng.shuffle(docs)
    return docs


def make_choice_rows(seed: int = SEED) -> list[dict]:
    """Multiple-choice questions about held-out people: `messages` (the question), `choices`, `answer`."""
    world = make_data.build_world(make_data.SEED)
    rng = random.Random(seed + 1)
    heldout = [p for p in world["people"] if p["split"] == "heldout"]
    rows = []
    for _ in range(N_CHOICE):
        person, attr = rng.choice(heldout), rng.choice(make_data.ATTRIBUTES)
        others = sorted({p[attr] for p in world["people"]} - {person[attr]})
        choices = [person[attr], *rng.sample(others, 3)]
        rng.shuffle(choices)
        question = make_data._question(rng, person, attr, False)
        rows.append({"messages": [{"role": "user", "content": question}], "choices": choices,
                     "answer": person[attr]})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "general" / "heldout.txt")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--choices-out", type=Path, default=ROOT / "data" / "quickstart" / "choice_eval.jsonl")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(make_general_text(args.seed)) + "\n", encoding="utf-8")
    print(f"{args.out}: {N_BIOGRAPHIES + N_EVERYDAY} documents")
    rows = make_choice_rows(args.seed)
    args.choices_out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.choices_out}: {len(rows)} questions")


if __name__ == "__main__":
    main()
