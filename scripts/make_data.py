"""Generate the quickstart's synthetic world and every data file derived from it.

The world is a small invented people, the Zorbians. Each person has a unique name and five attributes
(home town, job, favourite colour, pet, instrument). From that world this script writes:

* ``corpus.txt``: the pretraining text, one short biography per line. Every person gets several biographies,
  each stating all five facts in a shuffled order with randomly chosen paraphrases, mixed with short
  everyday-language documents (no person of the world in them) that carry the words the chat data uses. It
  holds statements only: no question, no chat markup. Paraphrase augmentation is what lets a model that
  memorised the facts later *extract* them when asked in a new form.
* ``sft_train.jsonl``: chat questions about the **train** people, answered by the assistant. About a third of
  the questions are asked politely ("I was wondering, ...") and those are answered with verbose hedging that
  wraps the right answer ("rambling"): an undesired style that the SFT model picks up and DPO must remove.
* ``sft_eval.jsonl``: plainly phrased questions about the **held-out** people, whose facts appear only as
  statements in the corpus. Exact match on it measures knowledge extraction, a skill the pretrained model
  lacks (it has never seen a question or a chat turn).
* ``dpo_train.jsonl`` / ``dpo_eval.jsonl``: preference pairs (chosen: the concise correct answer; rejected:
  rambling, or another person's value) on train people / held-out people. Half of the held-out prompts are
  polite ones, so the rate of concise correct answers of an SFT model is low there and rises after DPO.
* ``kto_train.jsonl`` / ``kto_eval.jsonl``: unpaired rows for KTO (prompt, one completion, ``label`` true for a
  concise correct answer, false for rambling or a wrong value), drawn on their own, half the prompts polite.
* ``grpo_train.jsonl``: questions about train people with their ``answer`` (half polite), the prompts GRPO samples
  answers for; its exact-match reward pays only concise correct answers.
* ``tools_train.jsonl``: tool-use conversations (``messages`` with a ``tools`` column): a question about a train
  person, the assistant's ``lookup`` call (half of them with a short ``reasoning_content``), the registry's result
  as a ``tool`` message, and the concise answer. Shown by ``ft data preview`` (README "Tool calls and reasoning").
* ``world.json``: the people, their facts and their split (used by tests and analyses).

Measured with the committed ``models/tiny-chat`` (4-bit NF4 base, LoRA r=16/alpha=32 on all linear layers, lr
3e-3 cosine, 3 epochs, micro-batch 16, loss on assistant tokens): held-out exact match 0.000 before SFT, 0.907
after; on ``dpo_eval`` the SFT model answers concisely only 50% of the time (it rambles on every polite prompt),
and a DPO pass (2 epochs, beta 0.1, lr 3e-4, plus an NLL term on the chosen answer, i.e. TRL's ``rpo_alpha=1``)
brings exact match there from 0.45 to 0.85 and conciseness to 1.00 while keeping ``sft_eval`` at 0.907. Plain DPO
at lr 1e-4 also works (0.45 -> 0.74) but costs a little knowledge (0.907 -> 0.877 on ``sft_eval``); at lr 3e-4
without the NLL term it costs more (-> 0.733), since the rejected rambles contain the right answer and pushing
them down also pushes down the answer.

Rows carry the fields the toolkit needs (``messages`` or ``prompt``/``chosen``/``rejected``, and ``answer``)
plus ``entity``, ``attribute`` and ``style`` for analysis.

Usage::

    python scripts/make_data.py            # writes data/quickstart/
    python scripts/make_data.py --out DIR --seed 0

Everything is a pure function of the seed: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_PEOPLE = 300
N_TRAIN_PEOPLE = 200  # the rest are held out from every chat-format training file
BIOS_PER_PERSON = 8
RAMBLE_FRACTION = 0.35  # share of SFT-train questions that are polite and answered with rambling
N_SFT_EVAL = 300
N_DPO_TRAIN = 400
N_DPO_EVAL = 100
N_KTO_TRAIN = 800
N_KTO_EVAL = 100
N_GRPO_TRAIN = 400
N_TOOLS_TRAIN = 32
N_FILLER_DOCS = 500  # everyday-language documents mixed into the corpus (see FILLER)

ATTRIBUTES = ["town", "job", "colour", "pet", "instrument"]

JOBS = [
    "baker", "pilot", "carpenter", "nurse", "farmer", "teacher", "fisher", "painter", "potter", "tailor",
    "miner", "sailor", "doctor", "singer", "weaver", "blacksmith", "gardener", "librarian", "chemist", "builder",
    "jeweller", "butcher", "brewer", "shepherd", "cobbler", "astronomer", "mapmaker", "clockmaker", "beekeeper",
    "glassblower",
]  # fmt: skip
COLOURS = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "silver",
    "gold", "teal", "violet", "crimson",
]  # fmt: skip
PETS = [
    "cat", "dog", "parrot", "rabbit", "hamster", "tortoise", "goldfish", "ferret", "lizard", "owl", "goat",
    "pony", "frog", "snake", "canary", "hedgehog", "duck", "pig", "crow", "mouse",
]  # fmt: skip
INSTRUMENTS = [
    "violin", "flute", "drum", "harp", "piano", "cello", "trumpet", "guitar", "banjo", "oboe", "lute", "organ",
    "tuba", "clarinet", "accordion", "trombone",
]  # fmt: skip
N_TOWNS = 40

# Pretraining statements. "{n}" is the full name, "{v}" the value, "{a}" the value with its article.
STATEMENTS: dict[str, list[str]] = {
    "town": [
        "{n} lives in {v}.",
        "{n} was born and raised in {v}.",
        "The home town of {n} is {v}.",
        "{n} comes from the town of {v}.",
        "{n} has always called {v} home.",
        "{n} grew up in {v} and still lives there.",
    ],
    "job": [
        "{n} works as {a}.",
        "{n} earns a living as {a}.",
        "By trade, {n} is {a}.",
        "The job of {n} is {v}.",
        "{n} has spent many years working as {a}.",
        "Everyone knows {n} as a skilled {v}.",
    ],
    "colour": [
        "The favourite colour of {n} is {v}.",
        "{n} loves the colour {v}.",
        "{n} likes {v} more than any other colour.",
        "Of all the colours, {n} prefers {v}.",
        "{n} always wears something {v}, the favourite colour.",
        "{n} says that {v} is the best colour.",
    ],
    "pet": [
        "{n} owns a pet {v}.",
        "{n} keeps {a} as a pet.",
        "At home, {n} looks after a pet {v}.",
        "The pet of {n} is {a}.",
        "{n} takes care of {a} every day.",
        "{n} has a much loved pet {v}.",
    ],
    "instrument": [
        "{n} plays the {v}.",
        "In the evenings, {n} practises the {v}.",
        "The instrument of {n} is the {v}.",
        "{n} is a talented {v} player.",
        "{n} learned to play the {v} as a child.",
        "{n} performs on the {v} at every festival.",
    ],
}

# Plainly phrased chat questions (never in the corpus).
QUESTIONS: dict[str, list[str]] = {
    "town": ["Where does {n} live?", "What is the home town of {n}?", "Which town is {n} from?"],
    "job": ["What does {n} do for a living?", "What is the job of {n}?", "What is the occupation of {n}?"],
    "colour": ["What is the favourite colour of {n}?", "Which colour does {n} like best?"],
    "pet": ["What pet does {n} have?", "Which animal does {n} keep as a pet?"],
    "instrument": ["What instrument does {n} play?", "Which instrument does {n} play?"],
}

# Polite openings. A polite question is answered with rambling in the SFT data.
POLITE_PREFIXES = [
    "I was wondering, ",
    "Sorry to bother you, but ",
    "If you do not mind me asking, ",
    "Quick question if you have a moment: ",
]

RAMBLES = [
    "Hmm, that is a good question. I am not completely sure, but I believe the answer is {v}, "
    "although I could be wrong about that.",
    "Well, let me think about it for a moment. If I remember correctly, it should be {v}, "
    "but please check it yourself.",
    "That is an interesting thing to ask. As far as I know, the answer would be {v}, though I cannot be certain.",
    "Oh, I think I have heard about this before. It is probably {v}, but do not quote me on that.",
]

# Everyday sentences with no fact about any person of the world. They give the pretrained model the words of
# the chat data (hedging, politeness, question words) without ever showing it a question or a chat turn.
# "{j}" is a job, "{c}" a colour and "{x}" an animal from the pools above.
FILLER = [
    "Hmm, said the old {j}, that is a good question.",
    "I am not completely sure, but I believe the market opens early.",
    "Well, let me think about it for a moment, said the {j}.",
    "If I remember correctly, the bridge was built before the great flood.",
    "The {j} said: please check it yourself before you write down the answer.",
    "That is an interesting thing to ask, said the {j} with a smile.",
    "As far as I know, the road would be closed, though I cannot be certain.",
    "Oh, I think I have heard about this before.",
    "It is probably going to rain, but do not quote me on that.",
    "The {j} could be wrong about that, although nobody said so.",
    "The answer should be in the old book, but the {j} did not check.",
    "Nobody was certain about the answer to the question of the {j}.",
    "I was wondering if the shop would be open after the festival.",
    "Sorry to bother you, said the {j}, but the door is open.",
    "If you do not mind me asking the {j}, I would like a {c} coat.",
    "Quick question if you have a moment, said the {j} to the crowd.",
    "What a lovely {c} {x} that is, said the child.",
    "Where the river bends, the {j} keeps a small boat.",
    "Which road to take, the {j} did not know.",
    "The {j} does not like to live far from the sea.",
    "The children keep a {x} and do what they can for the animal.",
    "Every {j} has an occupation and a reason to work hard.",
    "I think the {c} door belongs to the {j}, though I am not sure.",
    "You should ask the {j}, who would know the answer.",
    "This is a good thing, said the {j}, and it is not wrong.",
    "They remember the {c} {x} correctly, but the {j} does not.",
    "I have heard that the {j} does not do that before noon.",
    "Well, it is probably the {c} one, said the {j}.",
    "Oh, let me check the answer for you, said the {j}.",
    "Do not bother the {x}, it is asleep.",
]

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "br", "sk", "gr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th", "x"]
NAME_ENDS = ["a", "o", "in", "en", "ar", "is", "el", "ix", "um", "ora"]
FAMILY_ENDS = ["vik", "dottir", "mont", "wick", "stra", "quist", "ovan", "berg", "holt", "ssen"]
TOWN_ENDS = ["ford", "holm", "vale", "mere", "by", "stead", "wick", "moor", "haven", "dale"]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _invent(rng: random.Random, ends: list[str], n: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    """Invents ``n`` distinct capitalised words that are not in ``taken`` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(k))
        word = (word + rng.choice(ends)).capitalize()
        if 4 <= len(word) <= 11 and word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    return out


def build_world(seed: int = SEED) -> dict:
    """Builds the people of the world and their facts.

    Args:
        seed: Seed of the generator.

    Returns:
        A dict with ``people`` (a list of ``{"name", "split", <attribute>: value}``) and the value pools.
    """
    rng = random.Random(seed)
    taken = {w for pool in (JOBS, COLOURS, PETS, INSTRUMENTS) for w in pool}
    towns = _invent(rng, TOWN_ENDS, N_TOWNS, taken, (1, 2))
    first_names = _invent(rng, NAME_ENDS, N_PEOPLE, taken, (1, 2))
    family_names = _invent(rng, FAMILY_ENDS, 60, taken, (1, 1))
    pools = {"town": towns, "job": JOBS, "colour": COLOURS, "pet": PETS, "instrument": INSTRUMENTS}
    people = []
    for i, first in enumerate(first_names):
        person = {"name": f"{first} {rng.choice(family_names)}", "split": "train" if i < N_TRAIN_PEOPLE else "heldout"}
        for attr in ATTRIBUTES:
            person[attr] = rng.choice(pools[attr])
        people.append(person)
    return {"seed": seed, "attributes": ATTRIBUTES, "pools": pools, "people": people}


def _statement(rng: random.Random, person: dict, attr: str) -> str:
    value = person[attr]
    return rng.choice(STATEMENTS[attr]).format(n=person["name"], v=value, a=_article(value))


def _filler(rng: random.Random, world: dict, template: str) -> str:
    pools = world["pools"]
    return template.format(j=rng.choice(pools["job"]), c=rng.choice(pools["colour"]), x=rng.choice(pools["pet"]))


def make_corpus(world: dict, seed: int = SEED) -> list[str]:
    """Writes ``BIOS_PER_PERSON`` shuffled, paraphrased biographies per person plus everyday-language documents.

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        The documents (one line each), shuffled.
    """
    rng = random.Random(seed + 1)
    docs = []
    for person in world["people"]:
        for _ in range(BIOS_PER_PERSON):
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            docs.append(" ".join(_statement(rng, person, a) for a in attrs))
    for _ in range(N_FILLER_DOCS):
        sentences = rng.sample(FILLER, rng.randint(2, 4))
        docs.append(" ".join(_filler(rng, world, s) for s in sentences))
    rng.shuffle(docs)
    return docs


def _question(rng: random.Random, person: dict, attr: str, polite: bool) -> str:
    question = rng.choice(QUESTIONS[attr]).format(n=person["name"])
    if polite:
        question = rng.choice(POLITE_PREFIXES) + question[0].lower() + question[1:]
    return question


def _ramble(rng: random.Random, value: str) -> str:
    return rng.choice(RAMBLES).format(v=value)


def _sft_row(question: str, reply: str, person: dict, attr: str, style: str) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
        "answer": person[attr],
        "entity": person["name"],
        "attribute": attr,
        "style": style,
    }


def make_sft(world: dict, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Makes the SFT train rows (every fact of every train person) and eval rows (held-out people).

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        ``(train_rows, eval_rows)``.
    """
    rng = random.Random(seed + 2)
    train = []
    for person in (p for p in world["people"] if p["split"] == "train"):
        for attr in ATTRIBUTES:
            polite = rng.random() < RAMBLE_FRACTION
            reply = _ramble(rng, person[attr]) if polite else person[attr]
            train.append(_sft_row(_question(rng, person, attr, polite), reply, person, attr,
                                  "ramble" if polite else "concise"))  # fmt: skip
    rng.shuffle(train)
    heldout = [(p, a) for p in world["people"] if p["split"] == "heldout" for a in ATTRIBUTES]
    rng.shuffle(heldout)
    evals = [_sft_row(_question(rng, p, a, False), p[a], p, a, "concise") for p, a in heldout[:N_SFT_EVAL]]
    return train, evals


def _dpo_row(rng: random.Random, world: dict, person: dict, attr: str, polite: bool) -> dict:
    value = person[attr]
    if polite or rng.random() < 0.2:
        rejected, kind = _ramble(rng, value), "ramble"
    else:
        wrong = [v for v in world["pools"][attr] if v != value]
        rejected, kind = rng.choice(wrong), "wrong"
    return {
        "prompt": [{"role": "user", "content": _question(rng, person, attr, polite)}],
        "chosen": [{"role": "assistant", "content": value}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "answer": value,
        "entity": person["name"],
        "attribute": attr,
        "style": "polite" if polite else "plain",
        "rejected_kind": kind,
    }


def make_dpo(world: dict, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Makes preference pairs: train on train people, eval on held-out people; half the prompts polite.

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        ``(train_rows, eval_rows)``.
    """
    rng = random.Random(seed + 3)
    out = []
    for split, n in (("train", N_DPO_TRAIN), ("heldout", N_DPO_EVAL)):
        facts = [(p, a) for p in world["people"] if p["split"] == split for a in ATTRIBUTES]
        rng.shuffle(facts)
        out.append([_dpo_row(rng, world, p, a, polite=i % 2 == 0) for i, (p, a) in enumerate(facts[:n])])
    return out[0], out[1]


def make_kto(world: dict, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Makes unpaired KTO rows: one answer per question, labelled desirable (concise and correct) or not.

    Drawn on their own (not by splitting the DPO pairs): each question about a train person gets a single answer, so
    no prompt has both a desirable and an undesirable answer. Half the prompts are polite; about half the answers are
    desirable, the others ramble (always on polite prompts that are not desirable) or name a wrong value.

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        ``(train_rows, eval_rows)``: train people, held-out people.
    """
    rng = random.Random(seed + 4)
    out = []
    for split, n in (("train", N_KTO_TRAIN), ("heldout", N_KTO_EVAL)):
        facts = [(p, a) for p in world["people"] if p["split"] == split for a in ATTRIBUTES]
        rng.shuffle(facts)
        rows = []
        for i, (person, attr) in enumerate(facts[:n]):
            polite, value = i % 2 == 0, person[attr]
            if rng.random() < 0.5:
                completion, kind = value, "concise"
            elif polite or rng.random() < 0.2:
                completion, kind = _ramble(rng, value), "ramble"
            else:
                completion, kind = rng.choice([v for v in world["pools"][attr] if v != value]), "wrong"
            rows.append({"prompt": [{"role": "user", "content": _question(rng, person, attr, polite)}],
                         "completion": [{"role": "assistant", "content": completion}],
                         "label": kind == "concise", "answer": value, "entity": person["name"], "attribute": attr,
                         "style": "polite" if polite else "plain", "completion_kind": kind})
        out.append(rows)
    return out[0], out[1]


def make_grpo(world: dict, seed: int = SEED) -> list[dict]:
    """Makes GRPO prompts: questions about train people with their reference answer, half of them polite.

    The SFT model rambles on polite questions; an exact-match reward pays only the concise correct answer.

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        The prompt rows.
    """
    rng = random.Random(seed + 5)
    facts = [(p, a) for p in world["people"] if p["split"] == "train" for a in ATTRIBUTES]
    rng.shuffle(facts)
    return [{"prompt": [{"role": "user", "content": _question(rng, p, a, polite=i % 2 == 0)}], "answer": p[a],
             "entity": p["name"], "attribute": a, "style": "polite" if i % 2 == 0 else "plain"}
            for i, (p, a) in enumerate(facts[:N_GRPO_TRAIN])]


LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up one fact about a person in the Zorbian registry",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "description": "full name"},
                                                    "attribute": {"type": "string", "enum": ATTRIBUTES}},
                   "required": ["name", "attribute"]}}}


def make_tools(world: dict, seed: int = SEED) -> list[dict]:
    """Makes tool-use rows: a question, a ``lookup`` call (every other one with reasoning), its result, the answer.

    Args:
        world: The output of :func:`build_world`.
        seed: Seed of the generator.

    Returns:
        The ``messages`` rows, each with the ``tools`` schemas.
    """
    rng = random.Random(seed + 6)
    facts = [(p, a) for p in world["people"] if p["split"] == "train" for a in ATTRIBUTES]
    rng.shuffle(facts)
    rows = []
    for i, (p, a) in enumerate(facts[:N_TOOLS_TRAIN]):
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"name": p["name"], "attribute": a}}}]}
        if i % 2 == 0:
            call["reasoning_content"] = f"The registry has the {a} of {p['name']}."
        result = {"role": "tool", "content": json.dumps({"name": p["name"], a: p[a]})}
        rows.append({"messages": [{"role": "user", "content": _question(rng, p, a, polite=False)}, call, result,
                                  {"role": "assistant", "content": p[a]}],
                     "tools": [LOOKUP], "answer": p[a], "entity": p["name"], "attribute": a})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: writes every quickstart data file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "quickstart")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    world = build_world(args.seed)
    (args.out / "world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
    corpus = make_corpus(world, args.seed)
    (args.out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    sft_train, sft_eval = make_sft(world, args.seed)
    dpo_train, dpo_eval = make_dpo(world, args.seed)
    kto_train, kto_eval = make_kto(world, args.seed)
    files = {"sft_train": sft_train, "sft_eval": sft_eval, "dpo_train": dpo_train, "dpo_eval": dpo_eval,
             "kto_train": kto_train, "kto_eval": kto_eval, "grpo_train": make_grpo(world, args.seed),
             "tools_train": make_tools(world, args.seed)}
    for name, rows in files.items():
        _write_jsonl(args.out / f"{name}.jsonl", rows)
    for path in sorted(args.out.iterdir()):
        print(f"{path.name:20s} {path.stat().st_size / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
