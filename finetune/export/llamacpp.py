"""A GGUF export checked by llama.cpp itself (through llama-cpp-python), against the merged transformers model.

Three checks on the held-out conversations the merged export uses:

- tokenization: llama.cpp's token ids of each rendered chat text equal the trained tokenizer's (a wrong
  pre-tokenizer or a special token read as text shows up here first);
- next-token logits: mean KL(merged || llama.cpp) per token and top-1 agreement, within the thresholds of the
  quantisation (`THRESHOLDS`);
- greedy generation from a few conversation prompts: where the merged model ends its answer with a stop token
  within the budget, llama.cpp must end at a stop token too (not run on, not stop on another token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

THRESHOLDS: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 0.99),
    "f16": (1e-3, 0.98),
    "bf16": (1e-2, 0.93),
    "q8_0": (1e-2, 0.93),
    "q4_k_m": (1e-1, 0.85),
}
"""Per quantisation: (ceiling on the mean KL per token in nats, floor on top-1 agreement) against the merged float32
transformers model. Top-1 agreement counts the positions where the merged model's best token leads its second by more
than twice the largest logit difference there (`verify.Figures.top1_agreement_decisive`): on the real SmolLM2-135M
(49k tokens) 16 of 725 positions of a correct f16 export (mean KL 1e-5) flipped between near-tied tokens. f32/f16
differ from the merged model by float rounding only; bf16 keeps 8 bits of mantissa, q8_0 one byte per weight with a
scale per 32; q4_k_m about 4.8 bits per weight, so it is held to a looser, stated bound. Measured on the full
quickstart SFT of the tiny model (16 conversations, 392 tokens): f16 mean KL 1.2e-6, top-1 100%; bf16 5.4e-5, 100%;
q8_0 8.4e-4, 95.4%; q4_k_m 1.5e-2, 93.6% (most of the tiny model's tensors fall back from k-quants,
its rows being shorter than a 256-block)."""


def require_llama_cpp(why: str) -> Any:
    """The `llama_cpp` module, or an error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise FinetuneError(f"{why} needs llama-cpp-python (it builds llama.cpp from source): "
                            "pip install 'finetune[gguf]' (or pass --no-verify to skip the check)") from None
    return llama_cpp


def llama_cpp_version() -> str:
    """The llama-cpp-python version (which pins the llama.cpp it bundles)."""
    return f"llama-cpp-python {require_llama_cpp('GGUF verification').__version__}"


def open_gguf(path: Path, n_ctx: int, threads: int | None = None) -> Any:
    """llama.cpp's model and context for `path`, keeping the logits of every position."""
    llama_cpp = require_llama_cpp("GGUF verification")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=threads, seed=0)


@dataclass
class GgufCheck:
    """What llama.cpp did with the verification conversations."""

    figures: dict[str, Any]
    tokenization: dict[str, Any]
    generation: list[dict[str, Any]] = field(default_factory=list)

    def problems(self, max_kl: float, min_top1: float) -> list[str]:
        """Why the export must be refused (empty: it passes)."""
        out = []
        if self.tokenization["identical"] < self.tokenization["conversations"]:
            out.append(f"tokenization differs on {self.tokenization['conversations'] - self.tokenization['identical']}"
                       f" of {self.tokenization['conversations']} texts ({self.tokenization['first_mismatch']})")
        if self.figures["mean_kl"] > max_kl:
            out.append(f"mean KL {self.figures['mean_kl']:.3g} > {max_kl:g}")
        top1 = self.figures.get("top1_agreement_decisive", self.figures["top1_agreement"])
        if top1 < min_top1:
            out.append(f"top-1 agreement {top1:.2%} < {min_top1:.0%} (without the {self.figures.get('near_ties', 0)} "
                       "near-tied positions)")
        for g in self.generation:
            if g["transformers_stopped"] and not g["llama_cpp_stopped"]:
                out.append(f"greedy generation did not end at a stop token in llama.cpp: {g['llama_cpp']!r} "
                           f"(transformers: {g['transformers']!r})")
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for export.json."""
        return asdict(self)


def _tokens(tokenizer: Any, conversation: list[dict[str, str]] | str) -> tuple[str, list[int]]:
    if isinstance(conversation, str):
        return conversation, list(tokenizer(conversation)["input_ids"])
    prompt = conversation[-1]["role"] != "assistant"
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, add_generation_prompt=prompt)
    return text, list(ids["input_ids"])


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_gguf(llm: Any, merged: Any, tokenizer: Any, conversations: list, stop_ids: list[int],
               max_tokens: int = 256, generations: int = 3, max_new_tokens: int = 24) -> GgufCheck:
    """Compare llama.cpp (`llm`, from `open_gguf`) with the merged transformers model on `conversations`."""
    import torch

    from finetune.export.verify import compare_forwards

    identical, mismatch, inputs = 0, None, []
    for conversation in conversations:
        text, ids = _tokens(tokenizer, conversation)
        raw = isinstance(conversation, str)
        ours = llm.tokenize(text.encode("utf-8"), add_bos=raw, special=not raw)
        if ours == ids:
            identical += 1
        elif mismatch is None:
            at = _first_difference(ours, ids)
            mismatch = {"text": text[:200], "position": at, "transformers": ids[at:at + 8],
                        "llama_cpp": ours[at:at + 8]}
        inputs.append(ids[:max_tokens])
    tokenization = {"conversations": len(conversations), "identical": identical, "first_mismatch": mismatch}

    def llama_logits(x: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(x[0].tolist())
        return torch.from_numpy(llm.scores[: x.shape[1]].copy())[None]

    device = next(merged.parameters()).device
    figures = compare_forwards(lambda x: merged(input_ids=x.to(device)).logits, llama_logits, inputs)
    check = GgufCheck(figures=figures.as_dict(), tokenization=tokenization)
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations
               if not isinstance(c, str) and any(m["role"] == "assistant" for m in c[1:])]
    for prompt in prompts[:generations]:
        check.generation.append(_generate(llm, merged, tokenizer, prompt, stop_ids, max_new_tokens))
    return check


def _generate(llm: Any, merged: Any, tokenizer: Any, prompt: list[dict[str, str]], stop_ids: list[int],
              max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of both models to one prompt, and whether each ended at a stop token."""
    import llama_cpp
    import torch

    ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                             add_generation_prompt=True)["input_ids"])
    with torch.no_grad():
        out = merged.generate(torch.tensor([ids], device=next(merged.parameters()).device), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    answer: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        answer.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(answer) >= max_new_tokens:
            break
    return {
        "prompt": prompt[-1]["content"][:200],
        "transformers": tokenizer.decode(out),
        "llama_cpp": tokenizer.decode(answer),
        "transformers_stopped": bool(out) and out[-1] in stop_ids,
        "llama_cpp_stopped": bool(answer) and answer[-1] in stop_ids,
        "same_tokens": out == answer,
    }
