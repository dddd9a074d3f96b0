"""Benchmark assets: a word-level 32k tokenizer, a random Llama of realistic shape and a chat dataset.

Everything is a pure function of the size preset and the seed, built in seconds and cached by the caller.

* Tokenizer: one token per whitespace-separated word (a `tokenizers` WordLevel model over generated pseudo-words),
  ChatML template whose assistant turns (content and `<|im_end|>`) sit inside `{% generation %}` markers, so both
  `ft` (its own prefix masking) and `trl sft --assistant_only_loss` put labels on exactly the same tokens.
* Model: Llama architecture, random init, float32 safetensors. `full` is about 38M parameters (hidden 384, 8 layers,
  GQA 6/2 heads, MLP 1024, untied 32768-word embedding and head): the LM head is about half of the matmul FLOPs,
  as in small models with a modern vocabulary.
* `moe`: the same, as a Qwen3-MoE (8 experts, top-2, every layer): the experts hold almost all the weights, as in
  real MoE models, and only the two routed experts of a token run; `intermediate` is then one expert's size.
* Data: chat rows (one user turn, one assistant turn) whose total length in tokens is log-normal, clipped to
  [min, max]; the user share of a row is uniform in [0.3, 0.7]. Words follow a Zipf law with a fixed successor
  table half the time, so there is something to learn (held-out loss goes down). DPO pairs: a prompt, a chosen
  answer of the same kind and a rejected answer of Zipf noise, each sequence log-normal in length.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

ROLES = ["system", "user", "assistant"]
TURN_OVERHEAD = 6  # <|im_start|> role ... <|im_end|> for each of the two turns


@dataclass(frozen=True)
class Preset:
    """Model shape and data sizes of one benchmark size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    min_len: int
    max_len: int
    median_len: int
    sigma: float
    train_samples: int
    eval_samples: int
    experts: int = 0  # Mixture of Experts (a Qwen3-MoE): experts per layer, 0 for a dense Llama
    experts_per_token: int = 0


PRESETS = {
    "full": Preset(vocab=32768, hidden=384, intermediate=1024, layers=8, heads=6, kv_heads=2, min_len=32,
                   max_len=1024, median_len=160, sigma=0.8, train_samples=64, eval_samples=24),
    "tiny": Preset(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, min_len=16,
                   max_len=96, median_len=32, sigma=0.6, train_samples=8, eval_samples=4),
    # Qwen3-MoE-like: 8 experts of 2,048, top-2, in every layer; 604 MB of float32 experts (93% of the weights),
    # 38M parameters active per token, so that a step of 8 samples takes seconds on one thread
    "moe": Preset(vocab=8192, hidden=512, intermediate=2048, layers=6, heads=8, kv_heads=2, min_len=32, max_len=512,
                  median_len=160, sigma=0.6, train_samples=32, eval_samples=8, experts=8, experts_per_token=2),
    "moe-tiny": Preset(vocab=512, hidden=64, intermediate=64, layers=2, heads=4, kv_heads=2, min_len=16, max_len=96,
                       median_len=32, sigma=0.6, train_samples=8, eval_samples=4, experts=4, experts_per_token=2),
    # The real SmolLM2-135M-Instruct (`make real-model`), on questions about Python's documentation answered with
    # its prose (pydoc_data.topics): lengths in characters of the answer, about 4 per token.
    "smollm2": Preset(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, min_len=200,
                      max_len=1024, median_len=1600, sigma=0.6, train_samples=24, eval_samples=8),
}
REAL = {"smollm2": "smollm2-135m"}
# The model's own ChatML template (default system prompt included) with the assistant's content and end-of-turn
# token inside `{% generation %}`: `trl sft --assistant_only_loss` then labels the tokens `ft` labels.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _words(n: int) -> list[str]:
    """`n` distinct pronounceable pseudo-words (consonant-vowel syllables)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    syll = [c + v for c in cons for v in vows]
    out = []
    for i in range(n):
        w, k = "", i
        while True:
            w += syll[k % len(syll)]
            k //= len(syll)
            if k == 0:
                break
        out.append(w)
    return out


def build_tokenizer(out: Path, vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens with the ChatML template; saved to `out`."""
    from tiny_tokenizer import SPECIAL, word_level_chat_tokenizer
    from tokenizers import decoders, pre_tokenizers

    words = _words(vocab_size - len(SPECIAL) - len(ROLES))
    # one token per whitespace-separated word; WordPiece's decoder joins words with spaces
    tok = word_level_chat_tokenizer(ROLES + words, pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##"))
    tok.save_pretrained(str(out))
    return tok, words


def build_model(out: Path, p: Preset, seed: int) -> int:
    """A random Llama (or, with experts, Qwen3-MoE) of the preset's shape saved in float32; returns its parameter
    count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    shape = dict(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                 num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                 max_position_embeddings=max(p.max_len, 128), pad_token_id=0, bos_token_id=None, eos_token_id=3,
                 tie_word_embeddings=False)
    if p.experts:  # top-k weights renormalised as in the released Qwen3-MoE models
        cfg = Qwen3MoeConfig(**shape, head_dim=p.hidden // p.heads, num_experts=p.experts,
                             num_experts_per_tok=p.experts_per_token, moe_intermediate_size=p.intermediate,
                             norm_topk_prob=True)
    else:
        cfg = LlamaConfig(**shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    return sum(t.numel() for t in model.parameters())


def make_rows(words: list[str], p: Preset, n: int, rng: random.Random) -> list[dict]:
    """`n` chat rows with log-normal total lengths (in tokens, template included)."""
    weights = [1.0 / (k + 2.7) ** 1.1 for k in range(len(words))]
    cum, acc = [], 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    succ = list(range(len(words)))
    random.Random(1234).shuffle(succ)  # the same successor table for every split

    def text(k: int) -> str:
        out = [rng.choices(range(len(words)), cum_weights=cum)[0]]
        while len(out) < k:
            out.append(succ[out[-1]] if rng.random() < 0.5 else rng.choices(range(len(words)), cum_weights=cum)[0])
        return " ".join(words[i] for i in out)

    rows = []
    for _ in range(n):
        total = int(round(math.exp(rng.gauss(math.log(p.median_len), p.sigma))))
        total = min(max(total, p.min_len), p.max_len)
        body = total - TURN_OVERHEAD
        user = max(1, min(body - 1, int(round(body * rng.uniform(0.3, 0.7)))))
        rows.append({"messages": [{"role": "user", "content": text(user)},
                                  {"role": "assistant", "content": text(body - user)}]})
    return rows


def make_pairs(words: list[str], p: Preset, n: int, rng: random.Random) -> list[dict]:
    """`n` preference rows (prompt, chosen, rejected as message lists), each sequence log-normal in length.

    The chosen answers follow the successor table, the rejected ones are Zipf noise: a preference there is to learn.
    """
    rows = make_rows(words, p, 2 * n, rng)
    weights = [1.0 / (k + 2.7) ** 1.1 for k in range(len(words))]
    pairs = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        prompt, chosen = a["messages"]
        room = p.max_len - TURN_OVERHEAD - len(prompt["content"].split())
        n_rejected = max(1, min(room, len(b["messages"][1]["content"].split())))
        rejected = " ".join(rng.choices(words, weights=weights, k=n_rejected))
        pairs.append({"prompt": [prompt], "chosen": [chosen],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def real_model(out: Path, name: str) -> int:
    """The fetched real model (dequantized from its GGUF once, in the project's cache) as a model folder under
    `out`: its weights linked, its tokenizer with the generation-marked template. Returns its parameter count."""
    import shutil

    from finetune.model.fetch import model_path
    from finetune.model.gguf_base import materialize
    from finetune.recipe.schema import ModelConfig

    root = Path(__file__).resolve().parents[1]
    gguf = model_path(name, root)
    if not gguf.is_file():
        raise SystemExit(f"{gguf} is missing: run `make real-model` (ft models fetch {name}) first")
    source = materialize(ModelConfig(name_or_path=str(gguf), gguf_cache=str(root / ".cache/finetune/gguf")))
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).unlink(missing_ok=True)
            (out / f.name).symlink_to(f.resolve())
        elif f.name != "chat_template.jinja":
            shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE, encoding="utf-8")
    from safetensors import safe_open

    count = 0
    for weights in out.glob("*.safetensors"):  # the shapes from the file headers, no tensor read
        with safe_open(str(weights), "pt") as f:
            count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return count


def prose_rows(p: Preset, n: int, rng: random.Random, skip: int = 0) -> list[dict]:
    """Questions about Python's documentation answered with its text (log-normal lengths in characters)."""
    from pydoc_data.topics import topics

    keys = sorted(k for k in topics if len(topics[k]) > p.min_len)
    random.Random(7).shuffle(keys)
    rows = []
    for key in keys[skip:skip + n]:
        chars = min(max(int(math.exp(rng.gauss(math.log(p.median_len), p.sigma))), p.min_len), 4 * p.max_len)
        text = " ".join(topics[key].split())[:chars]
        rows.append({"messages": [{"role": "user", "content": f"What does Python's documentation say about {key}?"},
                                  {"role": "assistant", "content": text}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def build_assets(root: Path, preset: str, seed: int = 0, train_samples: int | None = None, mode: str = "sft") -> dict:
    """Model, tokenizer and data (`sft` chat rows or `dpo` pairs) under `root`, reused when built the same way."""
    p = PRESETS[preset]
    n_train = train_samples or p.train_samples
    key = {"preset": asdict(p), "seed": seed, "train_samples": n_train, "mode": mode, "version": 2}
    manifest = root / "assets.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("key") == key:
        return json.loads(manifest.read_text())
    model_dir = root / "model"
    rng = random.Random(seed)
    if preset in REAL:
        if mode != "sft":
            raise SystemExit(f"--preset {preset} has sft data only")
        params = real_model(model_dir, REAL[preset])
        train = write_jsonl(root / "data" / "train.jsonl", prose_rows(p, n_train, rng))
        held_out = write_jsonl(root / "eval.jsonl", prose_rows(p, p.eval_samples, rng, skip=n_train))
    else:
        _, words = build_tokenizer(model_dir, p.vocab)
        params = build_model(model_dir, p, seed)
        make = make_pairs if mode == "dpo" else make_rows
        train = write_jsonl(root / "data" / "train.jsonl", make(words, p, n_train, rng))  # trl reads data/ too
        held_out = write_jsonl(root / "eval.jsonl", make(words, p, p.eval_samples, rng))
    info = {"key": key, "model": str(model_dir), "train": str(train), "train_dir": str(train.parent),
            "eval": str(held_out), "parameters": params}
    manifest.write_text(json.dumps(info, indent=1))
    return info
