"""Per-expert ranks by routing against uniform ranks at the same trainable parameters (issue 30, `lora.expert_rank`).

Builds a tiny character-level Qwen3-MoE (8 experts, 2 per token, 2 layers) whose router favours two experts (their
router rows scaled up, so they take more routed slots), and data that a token-wise map decides: rows of pairs
"qX mD kP" (a random lowercase letter, then its image under one fixed mapping to uppercase letters), held-out rows of
other random letters. Then trains it with `ft train` (4-bit experts, `lora.experts: per_expert`, the same attention
adapter in every run) once per seed with `lora.expert_rank: uniform` and once with `by_routing`, and writes the
held-out loss of each, the trainable parameters the banner counted, the measured expert load and the ranks to
`bench/moe-ranks.md` (and `.json`).

    .venv/bin/python scripts/bench_moe_ranks.py --seeds 5      # 80 steps each (about 30 s per run here)
    .venv/bin/python scripts/bench_moe_ranks.py --seeds 1 --steps 10 --out /tmp/ranks   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERTS, TOP_K, FAVOURED, SCALE = 8, 2, (0, 1), 4.0


def build_model(out: Path, seed: int = 0) -> Path:
    """A character-level tokenizer and a random tiny Qwen3-MoE whose router prefers experts `FAVOURED`."""
    import torch
    from tokenizers import decoders, pre_tokenizers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from tiny_tokenizer import SPECIAL, word_level_chat_tokenizer

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = word_level_chat_tokenizer(chars, pre_tokenizers.Split(pattern="", behavior="isolated"), decoders.Fuse())
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    config = Qwen3MoeConfig(vocab_size=len(SPECIAL) + len(chars), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            max_position_embeddings=256, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                            moe_intermediate_size=32, pad_token_id=0, eos_token_id=3, bos_token_id=None,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
        model.get_input_embeddings().weight.normal_(0, 0.2)
        model.get_output_embeddings().weight.normal_(0, 0.2)
        for layer in model.model.layers:  # uneven routing: the favoured experts' scores spread wider
            for e in FAVOURED:
                layer.mlp.gate.weight[e] *= SCALE
    model.save_pretrained(str(out))
    return out


def write_data(folder: Path, pairs: int = 8) -> tuple[Path, Path]:
    """Rows of letter pairs "qX mD kP ...": a random lowercase letter, then its image under one fixed random mapping
    to uppercase letters (the same in every row), so the model must learn the mapping token by token (the MLP's,
    that is the experts', job); 400 training rows, 100 held-out rows of other random letters."""
    import random
    import string

    rng = random.Random(0)
    images = list(string.ascii_uppercase)
    rng.shuffle(images)
    mapping = dict(zip(string.ascii_lowercase, images, strict=True))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count in (("train", 400), ("eval", 100)):
        path = folder / f"{name}.jsonl"
        rows = []
        for _ in range(count):
            letters = [rng.choice(string.ascii_lowercase) for _ in range(pairs)]
            rows.append({"messages": [{"role": "user", "content": "pairs"},
                                      {"role": "assistant", "content": " ".join(c + mapping[c] for c in letters)}]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def run(folder: Path, model: Path, train: Path, held_out: Path, rank: str, seed: int, steps: int) -> dict:
    """`ft train` one recipe in its own process; its held-out loss, the banner's counts and the ranks it used."""
    recipe = folder / f"{rank}-{seed}.yaml"
    run_dir = folder / "runs" / f"{rank}-{seed}"
    recipe.write_text(f"""name: {rank}-{seed}
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32, experts: true}}
lora: {{r: 4, alpha: 8, target_modules: [o_proj], experts: per_expert, expert_rank: {rank}}}
data: {{train: [{{path: {train}}}], eval: [{{path: {held_out}}}], max_length: 64}}
training: {{max_steps: {steps}, micro_batch_size: 16, learning_rate: 1.0e-2, logging_steps: 10, seed: {seed},
  save_steps: 100000}}
output: {{dir: {run_dir}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe), "--overwrite"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ft train {recipe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    banner = re.search(r"adapter: ([\d,]+) trainable .*?experts ([\d,]+)", done.stdout)
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    from finetune.model.expert_adapters import saved_ranks

    return {"rank": rank, "seed": seed, "eval_loss": summary["metrics"]["eval_loss"],
            "trainable": int(banner.group(1).replace(",", "")), "experts": int(banner.group(2).replace(",", "")),
            "ranks": saved_ranks(run_dir / "sft" / "adapter")}


def measured_load(model: Path, train: Path) -> list[list[float]]:
    """The base model's expert load on the first 64 training rows (what `by_routing` measures)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.eval.routing import expert_load

    tok = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    rows = [json.loads(x)["messages"] for x in train.read_text().splitlines()[:64]]
    batches = [{"input_ids": torch.tensor([tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]])}
               for m in rows]
    return expert_load(base, batches).tolist()


def report(results: list[dict], load: list[list[float]], steps: int) -> str:
    lines = ["# Per-expert ranks by routing vs uniform ranks (issue 30)", "",
             "`scripts/bench_moe_ranks.py`: a tiny character-level Qwen3-MoE (hidden 64, 2 layers, 8 experts, 2 per "
             f"token; the router rows of experts {FAVOURED[0]} and {FAVOURED[1]} scaled by {SCALE:g} so that they "
             "take most routed slots), 4-bit experts (`quantization.experts: true`), per-expert adapters r=4 "
             "(`lora.experts: per_expert`) and the same attention adapter (o_proj, r=4) in every run; rows of 8 "
             "letter pairs \"qX mD kP ...\" (a random lowercase letter, then its image under one fixed random "
             "mapping to uppercase), 400 training rows, 100 held-out rows of other random letters; "
             f"{steps} steps of 16 rows at lr 1e-2. Held-out loss = the stage's eval loss on the held-out rows "
             "(its floor is not 0: a third of the labelled tokens are the random letters, ln 26 = 3.26 each at "
             "best).", "",
             "Expert load of the float base on the first 64 training rows (share of routed slots; even: "
             f"{1 / EXPERTS:.3f}; each `by_routing` run measures its own 4-bit base the same way, and its ranks "
             "below are the ones it trained):", ""]
    for i, row in enumerate(load):
        lines.append(f"- layer {i}: " + ", ".join(f"{x:.3f}" for x in row))
    lines += ["", "| expert_rank | seed | trainable (all) | trainable (experts) | ranks (layer 0; layer 1) | "
              "held-out loss |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ranks = "; ".join(" ".join(map(str, layer)) for layer in r["ranks"]) if r["ranks"] else "4 each"
        lines.append(f"| {r['rank']} | {r['seed']} | {r['trainable']:,} | {r['experts']:,} | {ranks} | "
                     f"{r['eval_loss']:.4f} |")
    means = {k: statistics.mean(r["eval_loss"] for r in results if r["rank"] == k) for k in ("uniform", "by_routing")}
    by_seed = {(r["rank"], r["seed"]): r["eval_loss"] for r in results}
    diffs = [by_seed["by_routing", s] - by_seed["uniform", s] for s in sorted({r["seed"] for r in results})]
    lines += ["", f"Mean held-out loss: uniform {means['uniform']:.4f}, by_routing {means['by_routing']:.4f} "
              f"({'no worse' if means['by_routing'] <= means['uniform'] else 'worse'} at equal trainable parameters); "
              f"by_routing minus uniform, seed by seed: {', '.join(f'{d:+.4f}' for d in diffs)} (lower or equal in "
              f"{sum(d <= 0 for d in diffs)} of {len(diffs)} seeds).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from OUT/moe-ranks.json")
    args = parser.parse_args(argv)
    if args.report_only:
        summary = json.loads((args.out / "moe-ranks.json").read_text())
        (args.out / "moe-ranks.md").write_text(report(summary["runs"], summary["load"], summary["steps"]))
        return summary
    work = args.out / "moe-ranks"
    model = build_model(work / "model")
    train, held_out = write_data(work / "data")
    load = measured_load(model, train)
    results = []
    for seed in range(args.seeds):
        for rank in ("uniform", "by_routing"):
            results.append(run(work, model, train, held_out, rank, seed, args.steps))
            print(json.dumps(results[-1]), flush=True)
    assert len({r["trainable"] for r in results}) == 1, "the trainable parameters differ between runs"
    text = report(results, load, args.steps)
    (args.out / "moe-ranks.md").write_text(text)
    summary = {"load": load, "runs": results, "steps": args.steps}
    (args.out / "moe-ranks.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return summary


if __name__ == "__main__":
    main()
