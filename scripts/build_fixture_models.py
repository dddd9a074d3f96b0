"""Tiny random models of real families, each with its own small tokenizer and the family's chat-template quirks.

The conformance matrix (`tests/integration/test_model_zoo.py`) walks each through every step a user takes. Models
are random (hidden 64, 2 layers), so they build offline in about a second; what is real is what breaks things after
training: the architecture class (Conv1D in GPT-2, fused qkv in Phi-3, experts as fused 3D parameters in the MoE
families), the special tokens (a pad token or none, NeoX's `<|padding|>`, Llama 3's reserved tokens) and the chat
template (Llama 3's headers and bos, Mistral's `[INST]` without a system role, Gemma's `model` role, Qwen2.5's default
system prompt, Qwen3's `<think>` block, none at all for the base models).

Tokenizers are byte-level BPE learnt on the fixture task's text (the SentencePiece shapes of Mistral, Gemma and Phi-3
are covered by `tests/tinyspm.py` for GGUF). Usage: `python scripts/build_fixture_models.py OUT [FAMILY ...]`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_TURNS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # Qwen2.5: a default system prompt when the conversation has none
    "qwen2": ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n' }}"
              "{% endif %}" + CHATML_TURNS),
    # Qwen3: the last assistant turn carries a (here empty) <think> block that the generation prompt does not
    "qwen3": ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
              "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Mistral: [INST] turns, answers ended by eos, no system role
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Gemma: `model` for the assistant, no system role, eos is <eos> while turns end with <end_of_turn>
    "gemma": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] "
              "| trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "olmo2": ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


@dataclass
class Family:
    """One family: its transformers config class and extra config keys, its tokenizer's special tokens, template."""

    config: str
    specials: list[str]
    tokens: dict[str, str | None]  # bos/eos/unk/pad token names (None: the tokenizer has none)
    template: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    add_bos: bool = False  # the tokenizer itself puts bos in front of every text (Llama 3, Mistral, Gemma)
    rstrip: bool = False  # chat tokens swallow the whitespace after them (Phi-3; llama.cpp's phi3 does the same)
    chat: bool = True  # an instruct model (trained on chat data); False: a base model trained on text


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

FAMILIES: dict[str, Family] = {
    "llama3": Family("LlamaConfig", LLAMA3_SPECIALS, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "unk": None,
                                                       "pad": None}, TEMPLATES["llama3"], add_bos=True),
    "qwen2.5": Family("Qwen2Config", QWEN_SPECIALS, {"bos": None, "eos": "<|im_end|>", "unk": None,
                                                      "pad": "<|endoftext|>"}, TEMPLATES["qwen2"],
                      {"tie_word_embeddings": True}),
    "qwen3": Family("Qwen3Config", [*QWEN_SPECIALS, "<think>", "</think>"],
                    {"bos": None, "eos": "<|im_end|>", "unk": None, "pad": "<|endoftext|>"}, TEMPLATES["qwen3"],
                    {"tie_word_embeddings": True, "head_dim": 16}),
    "mistral": Family("MistralConfig", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                      {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None}, TEMPLATES["mistral"],
                      add_bos=True),
    "gemma2": Family("Gemma2Config", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                     {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}, TEMPLATES["gemma"],
                     {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}, add_bos=True),
    "gemma3": Family("Gemma3TextConfig", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                     {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}, TEMPLATES["gemma"],
                     # six layers: five sliding, then one global with its own rope base (Gemma 3's pattern)
                     {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64, "num_hidden_layers": 6},
                     add_bos=True),
    "phi3": Family("Phi3Config", ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>",
                                  "<|system|>", "<|end|>"],
                   {"bos": "<s>", "eos": "<|end|>", "unk": "<unk>", "pad": "<|endoftext|>"}, TEMPLATES["phi3"],
                   rstrip=True),
    "olmo2": Family("Olmo2Config", ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"],
                    {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": None, "pad": "<|pad|>"},
                    TEMPLATES["olmo2"]),
    "gpt-neox": Family("GPTNeoXConfig", ["<|endoftext|>", "<|padding|>"],
                       {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": None}, None,
                       {"rotary_pct": 0.25, "use_parallel_residual": True}, chat=False),
    "gpt2": Family("GPT2Config", ["<|endoftext|>"],
                   {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": None}, None,
                   {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}, chat=False),
    "qwen3-moe": Family("Qwen3MoeConfig", QWEN_SPECIALS, {"bos": None, "eos": "<|im_end|>", "unk": None,
                                                          "pad": "<|endoftext|>"}, CHATML_TURNS,
                        {"head_dim": 16, **MOE, "norm_topk_prob": True}),  # as the released Qwen3-MoE models
    "mixtral": Family("MixtralConfig", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                      {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None}, TEMPLATES["mistral"],
                      {"num_local_experts": 4, "num_experts_per_tok": 2}, add_bos=True),
}


def task_rows(n: int, offset: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer): name the word of a digit."""
    return [(f"What is {i % 8} in words?", WORDS[i % 8], WORDS[(i % 8 + 3) % 8]) for i in range(offset, offset + n)]


def text_rows(n: int, offset: int = 0) -> list[str]:
    """Plain text for the base families: the same facts as sentences."""
    return [f"The word for {i % 8} is {WORDS[i % 8]}." for i in range(offset, offset + n)]


def build_tokenizer(fam: Family, out: Path):
    """A byte-level BPE tokenizer with the family's special tokens (ids from 0, in order) and template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"user\n{q}\nassistant\n{a}\nsystem\nmodel\nYou are helpful. {t}" for (q, a, _), t in
              zip(task_rows(64), text_rows(64), strict=True)] + [QWEN_SYSTEM]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=fam.specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if fam.rstrip:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t not in ("<|endoftext|>",
                                                                                                "<unk>", "<s>"))
                                    for t in fam.specials])
    bos = fam.tokens["bos"]
    if fam.add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    named = {f"{k}_token": v for k, v in fam.tokens.items() if v is not None}
    rest = [t for t in fam.specials if t not in named.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=rest, **named)
    if fam.template is not None:
        tok.chat_template = fam.template
    tok.save_pretrained(str(out))
    return tok


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Write the family's tokenizer and a random tiny model to `out` (safetensors) and return `out`."""
    import torch
    import transformers

    fam = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(fam, out)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in fam.tokens.items() if v and k != "unk"}
    ids.setdefault("bos_token_id", None)
    sizes = {} if family == "gpt2" else SMALL
    config = getattr(transformers, fam.config)(vocab_size=len(tok), **{**sizes, **fam.extra}, **ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights of one scale whatever each family's init: embeddings and output rows large
        for p in model.parameters():  # enough that an adapter can move the logits in a few dozen steps
            if p.dim() > 1:
                p.normal_(0, 0.05)
        model.get_input_embeddings().weight.normal_(0, 0.2)
        model.get_output_embeddings().weight.normal_(0, 0.2)
    model.save_pretrained(str(out))
    return out


def build_generic(model_type: str, out: Path, tokenizer_of: str = "qwen2.5", seed: int = 0) -> Path:
    """Any family transformers ships, built from its config class generically (`AutoConfig.for_model`) with the
    common size keys, and the tokenizer of `tokenizer_of`; keeps the matrix honest about families not listed here."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES[tokenizer_of]
    tok = build_tokenizer(fam, out)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tok), **SMALL, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.2)
        model.get_output_embeddings().weight.normal_(0, 0.2)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    for family in argv[1:] or list(FAMILIES):
        print(build(family, out / family))


if __name__ == "__main__":
    main(sys.argv[1:])
