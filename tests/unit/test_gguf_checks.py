"""GGUF export without llama.cpp: refusals before any model loads, the chat template and Modelfile translation,
tensor layouts and rope factors against transformers' own functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.export.command import export_run

ROOT = Path(__file__).resolve().parents[2]
TINY_CHAT = ROOT / "models" / "tiny-chat"


def make_run(tmp_path: Path, model: Path, finished: bool = True) -> Path:
    """A run folder whose sft stage finished, with the tokenizer saved next to its adapter (no weights: the checks
    under test must fail before anything loads them)."""
    run = tmp_path / "run"
    (run / "sft" / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"name: r\nmodel: {{name_or_path: {model}}}\n"
                                     "data: {train: [{path: train.jsonl}]}\n")
    (run / "sft" / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model / f).exists():
            shutil.copy(model / f, run / "sft" / "adapter" / f)
    if finished:
        (run / "sft" / "summary.json").write_text("{}")
    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to build the trained model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr("finetune.export.merge.build_reference", refuse)


def test_unknown_quantisation_refused(tmp_path, no_model_load):
    with pytest.raises(FinetuneError, match=r"--quant q3_x: unknown quantisation; choose one of f32, f16, bf16, q8_0"):
        export_run(make_run(tmp_path, TINY_CHAT), "gguf", quant="q3_x")


def test_unfinished_run_refused(tmp_path, no_model_load):
    with pytest.raises(FinetuneError, match="has no finished stage yet"):
        export_run(make_run(tmp_path, TINY_CHAT, finished=False), "gguf")


def test_unknown_architecture_refused(tmp_path, no_model_load):
    model = tmp_path / "gpt2"
    model.mkdir()
    shutil.copy(TINY_CHAT / "tokenizer.json", model)
    shutil.copy(TINY_CHAT / "tokenizer_config.json", model)
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(FinetuneError, match=r"does not know the architecture 'gpt2' \(supported: gemma2, gemma3_text, "
                                            r"llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe\)"
                                            r".*--format merged"):
        export_run(make_run(tmp_path, model), "gguf")


def test_tokenizer_without_chat_template_refused(tmp_path, no_model_load):
    run = make_run(tmp_path, TINY_CHAT)
    cfg_path = run / "sft" / "adapter" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FinetuneError, match=r"has no chat template.*data.template"):
        export_run(run, "gguf")


def test_tokenizer_llama_cpp_cannot_reproduce_refused(tmp_path, tiny_model, no_model_load):
    """The tests' character model: a WordLevel tokenizer, which llama.cpp has no model for."""
    run = make_run(tmp_path, tiny_model)
    with pytest.raises(FinetuneError, match=r"tokenizer.json: a WordLevel tokenizer is not written to GGUF here"):
        export_run(run, "gguf")


def test_options_of_other_formats_refused():
    from finetune.export.command import check_options

    with pytest.raises(FinetuneError, match=r"--quant: only for --format gguf"):
        check_options("merged", {"--quant": "q8_0"})
    with pytest.raises(FinetuneError, match=r"--dtype, --compare: only for --format merged"):
        check_options("gguf", {"--dtype": "bf16", "--compare": True})
    with pytest.raises(FinetuneError, match=r"--no-verify: only for --format merged or --format gguf \(an adapter"):
        check_options("adapter", {"--no-verify": True})
    with pytest.raises(FinetuneError, match=r"--format ggml: choose one of adapter, merged, gguf"):
        check_options("ggml", {})
    check_options("gguf", {"--quant": "q8_0", "--max-kl": 0.1, "--merge-into": "original"})


def test_pre_tokenizers_recognised_or_refused():
    from finetune.export.gguf_vocab import KNOWN_SPLITS, pre_tokenizer_name, tokenizer_model

    tiny = json.loads((TINY_CHAT / "tokenizer.json").read_text())
    assert pre_tokenizer_name(tiny, "t") == "gpt-2"
    for split, name in KNOWN_SPLITS.items():
        seq = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        assert pre_tokenizer_name({**tiny, "pre_tokenizer": seq}, "t") == name
        seq["pretokenizers"][0]["pattern"]["Regex"] = split.replace(r"\p{N}", r"\d")
        with pytest.raises(FinetuneError, match="not one llama.cpp is known to reproduce"):
            pre_tokenizer_name({**tiny, "pre_tokenizer": seq}, "t")
    spm = {**tiny, "model": {**tiny["model"], "byte_fallback": True}}  # byte fallback, but a byte-level pre-tokenizer
    with pytest.raises(FinetuneError, match="SentencePiece-style tokenizer with normalizer .* not one llama.cpp"):
        tokenizer_model(spm, "t")


@pytest.mark.parametrize("prefix, expected", [("legacy", True), ("none", False), ("first", None)])
def test_sentencepiece_space_prefix_recognised_or_refused(tmp_path, prefix, expected):

    """Mistral / Phi-3 (`Prepend("▁")`: after every special token, as llama.cpp does) and Gemma (no prefix) are
    written with llama.cpp's SentencePiece model; Metaspace `first` (the first text only) is refused, naming why."""
    from tinyspm import build_spm_tokenizer

    from finetune.export.gguf_vocab import spm_space_prefix, tokenizer_model

    build_spm_tokenizer(tmp_path, vocab_size=400, space_prefix=prefix)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    if expected is None:
        with pytest.raises(FinetuneError, match="prepend_scheme 'first'.*after every special token"):
            tokenizer_model(data, "t")
        return
    assert tokenizer_model(data, "t") == "llama" and spm_space_prefix(data, "t") is expected


def test_chat_template_in_gguf_renders_like_the_trained_one():
    """The `{% generation %}` markers go (other Jinja engines do not know them); the rendered text stays."""
    import jinja2
    from transformers import AutoTokenizer

    from finetune.data.templates import REGISTRY
    from finetune.export.gguf_vocab import gguf_chat_template

    tok = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " Yes "}, {"role": "user", "content": "2+2?"}]
    for template in (tok.chat_template, REGISTRY["chatml"].jinja, REGISTRY["llama-3"].jinja):
        plain = gguf_chat_template(template)
        assert "endgeneration" not in plain and "generation %}" not in plain and "generation -%}" not in plain
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders templates
        rendered = env.from_string(plain).render(messages=conv, add_generation_prompt=True, bos_token="",
                                                 eos_token=tok.eos_token)
        assert rendered == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                                   chat_template=template)


@pytest.mark.parametrize("name", ["tiny-chat", "chatml", "llama-3", "phi-3", "mistral", "gemma"])
def test_ollama_template_translation(name):
    """Per-message templates translate and render like the original; the others are refused with a reason."""
    from transformers import AutoTokenizer

    from finetune.data.templates import REGISTRY
    from finetune.export.modelfile import Untranslatable, go_template, render_parts, template_parts

    tok = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    if name != "tiny-chat":
        tok.chat_template = REGISTRY[name].jinja
    if name in ("mistral", "gemma"):  # the system prompt is folded into the first user turn
        with pytest.raises(Untranslatable, match="does not render as a wrapper|renders differently"):
            template_parts(tok)
        return
    parts = template_parts(tok)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert render_parts(parts, conv, True) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    template = go_template(parts)
    assert template.count("{{ .Content }}") == 3 and "{{-" not in template
    assert parts.generation_prompt in template


def test_llama3_rope_divisors_match_transformers():
    """The rope_freqs tensor is the ratio of plain to llama3-scaled inverse frequencies transformers computes."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from finetune.export.gguf_arch import extra_tensors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    ours = torch.from_numpy(extra_tensors(config)["rope_freqs.weight"]).double()
    torch.testing.assert_close(ours, plain / scaled.double(), rtol=1e-5, atol=0)
    assert ours.min() == 1.0 and ours.max() == 8.0  # both ends of the blend occur


def test_qk_permutation_turns_rotate_half_into_interleaved_pairs():
    """Row r of head h in transformers' order (halves) lands where llama.cpp pairs dimension i with i + d/2."""
    import numpy as np
    from transformers import LlamaConfig

    from finetune.export.gguf_arch import ARCHS, to_gguf_layout

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    rows = np.arange(16, dtype=np.float32)[:, None].repeat(3, 1)  # 2 heads x 8 dims; row value = its index
    out = to_gguf_layout("model.layers.0.self_attn.q_proj.weight", rows, config, ARCHS["llama"])[:, 0]
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    k = to_gguf_layout("model.layers.0.self_attn.k_proj.weight", rows[:8], config, ARCHS["llama"])[:, 0]
    assert k.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert (to_gguf_layout("model.layers.0.self_attn.q_proj.weight", rows, config, ARCHS["qwen2"]) == rows).all()
