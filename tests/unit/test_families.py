"""Model families after training (issue 29): the tokenizer's own pad token, one tokenizer loader everywhere, text
runs (held-out text loss, raw generation, no invented template), the Conv1D merge layout, export failures as one
line, and the family lines of `ft validate`. Tiny tokenizers and models from `scripts/build_fixture_models.py`."""

from __future__ import annotations

import json

import pytest
import torch
from build_fixture_models import FAMILIES, build, build_tokenizer

from finetune.errors import FinetuneError
from finetune.model.loading import load_tokenizer


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    return {name: build_tokenizer(FAMILIES[name], out / name) and out / name for name in ("gpt-neox", "llama3", "gpt2")}


def test_neox_pads_with_its_own_padding_token(fixtures, capsys):
    tok = load_tokenizer(None, str(fixtures["gpt-neox"]))
    assert tok.pad_token == "<|padding|>" and len(tok) == len(load_tokenizer(None, str(fixtures["gpt-neox"])))
    assert "<|pad|>" not in tok.get_vocab()
    assert "padding with <|padding|>" in capsys.readouterr().out


def test_llama3_pads_with_a_reserved_token_not_a_new_one(fixtures):
    tok = load_tokenizer(None, str(fixtures["llama3"]))
    assert tok.pad_token == "<|reserved_special_token_0|>" and "<|pad|>" not in tok.get_vocab()
    assert tok.pad_token_id != tok.eos_token_id


def test_gpt2_has_no_token_to_spare_and_gets_one(fixtures):
    tok = load_tokenizer(None, str(fixtures["gpt2"]))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id


def test_generate_and_eval_load_a_base_folder_with_the_pad_fix(tmp_path):
    """`ft eval --against BASE` crashed padding a batch: the base's tokenizer was loaded without the pad fix."""
    from finetune.eval.tasks import generate_answers
    from finetune.export.evaluate import Target, _tokenizer
    from finetune.export.generate import load

    model = build("gpt-neox", tmp_path / "neox")
    assert _tokenizer(Target(model)).pad_token == "<|padding|>"
    loaded = load(model)
    assert loaded.tokenizer.pad_token == "<|padding|>" and loaded.raw  # no chat template: raw completion
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    answers = generate_answers(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "The word"}],
                                                                 [{"role": "user", "content": "for 3 is a long one"}]],
                               max_new_tokens=2)
    assert len(answers) == 2


def test_generate_raw_and_chat_without_a_template(tmp_path, capsys):
    from finetune.export.generate import generate, load

    loaded = load(build("gpt-neox", tmp_path / "neox"))
    text = generate(loaded, "The word for 5 is", max_new_tokens=3, stream=False)
    assert isinstance(text, str)
    with pytest.raises(FinetuneError, match="no chat template to answer through; use --raw"):
        generate(loaded, "The word for 5 is", max_new_tokens=3, stream=False, raw=False)
    with pytest.raises(FinetuneError, match="--system needs a chat template"):
        generate(loaded, "x", system="be brief", stream=False)


def test_text_only_stages_are_told_by_their_first_row(tmp_path):
    from finetune.data.textonly import invented_template, trains_on_text_only
    from finetune.recipe.schema import DataConfig

    text, chat = tmp_path / "t.jsonl", tmp_path / "c.jsonl"
    text.write_text(json.dumps({"text": "The word for 1 is one."}) + "\n")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n")
    assert trains_on_text_only(DataConfig(train=[{"path": str(text)}]))
    assert not trains_on_text_only(DataConfig(train=[{"path": str(text)}, {"path": str(chat)}]))
    assert trains_on_text_only(DataConfig(train=[{"path": str(chat), "format": "text", "columns": {}}])) is True
    tok = load_tokenizer(None, str(build_tokenizer(FAMILIES["gpt-neox"], tmp_path / "neox") and tmp_path / "neox"))
    assert invented_template(tok, DataConfig(train=[{"path": str(text)}]))
    assert not invented_template(tok, DataConfig(train=[{"path": str(text)}], template="chatml"))


def test_heldout_scores_text_rows_and_says_what_it_skipped(tmp_path):
    from finetune.data.templates import apply_template
    from finetune.eval.suite import Suite, heldout_samples

    tok = load_tokenizer(None, str(build_tokenizer(FAMILIES["qwen2.5"], tmp_path / "q") and tmp_path / "q"))
    template = apply_template(tok, "tokenizer")
    long = [{"role": "user", "content": "What is 1 in words? " * 40}, {"role": "assistant", "content": "one"}]
    suite = Suite(heldout=[{"text": "The word for 1 is one."}, {"messages": long},
                           {"messages": [{"role": "user", "content": "What is 2 in words?"},
                                         {"role": "assistant", "content": "two"}]}], max_length=64)
    samples, counts = heldout_samples(tok, template, suite)
    assert counts == {"chat": 1, "text": 1, "skipped_no_labels": 1} and len(samples) == 2
    ids, labels = samples[0]
    assert labels == ids and ids[-1] == tok.eos_token_id  # text: every token trained, as training encoded it


def test_conv1d_weights_go_back_to_their_layout():
    """A QLoRA GPT-2 holds its Conv1D weights as Linear4bit ([out, in]): merged from there they were written into the
    Conv1D slots as they were and the reload died; square ones (attention c_proj) would even have loaded, wrong."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.export.merge import to_conv1d_layout

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    trained = GPT2LMHeadModel(config)
    want = {k: v.clone() for k, v in trained.state_dict().items()}
    attn = trained.transformer.h[0].attn
    attn.c_attn, attn.c_proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)  # as bitsandbytes holds them

    class Reference:  # what peft's model offers the merge
        def get_base_model(self):
            return trained

    state = {k: v.clone() for k, v in want.items()}
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"):
        state[key] = state[key].T.clone()
    assert to_conv1d_layout(state, Reference()) == ["transformer.h.0.attn.c_attn.weight",
                                                    "transformer.h.0.attn.c_proj.weight"]
    assert all(torch.equal(state[k], want[k]) for k in want)  # the square c_proj included; the MLP's untouched
    with pytest.raises(FinetuneError, match=r"c_fc.weight has shape \[3, 3\], the model expects \[32, 128\]"):
        to_conv1d_layout({"transformer.h.0.mlp.c_fc.weight": torch.zeros(3, 3)}, Reference())


def test_an_unexpected_export_failure_is_one_line_saying_what_to_do():
    from finetune.export.command import failure_line

    err = RuntimeError("Error(s) in loading state_dict for GPT2LMHeadModel:\n\tsize mismatch ... "
                       "ignore_mismatched_sizes=True")
    line = failure_line("merged", "sft", err)
    assert "\n" not in line and line.startswith("merged export of stage 'sft' failed and nothing was written: "
                                                "RuntimeError: Error(s) in loading state_dict")
    assert "Try --merge-into original or --format adapter" in line
    assert "--merge-into" not in failure_line("merged", "sft", err, merge_into="original").split("Try")[1]


def test_validate_names_the_family_and_what_it_cannot_do(tmp_path):
    from finetune.export.support import family_lines
    from finetune.recipe.schema import Recipe

    lines = {}
    for kind in ("gpt2", "llama"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": kind}))
        lines[kind] = family_lines(Recipe(model={"name_or_path": str(folder)}, data={"train": [{"path": "x"}]}))
    assert lines["llama"] == ["# model family: llama"]
    assert lines["gpt2"][0] == "# model family: gpt2"
    assert "ft export --format gguf: refused, this toolkit does not write the 'gpt2' architecture" in lines["gpt2"][1]
    assert "instead: ft export --format merged, then llama.cpp's convert_hf_to_gguf.py" in lines["gpt2"][1]


def test_an_end_of_turn_token_that_swallows_the_newline_keeps_its_label(tmp_path):
    """Phi-3's <|end|> takes the newline after it into its offsets: its last character fell outside the assistant
    turn, so no <|end|> was trained (the preflight refused every row: '0/64 kept it')."""
    from finetune.data.encode import encode_messages
    from finetune.data.templates import apply_template

    tok = load_tokenizer(None, str(build_tokenizer(FAMILIES["phi3"], tmp_path / "p") and tmp_path / "p"))
    template = apply_template(tok, "tokenizer")
    messages = [{"role": "user", "content": "What is 3 in words?"}, {"role": "assistant", "content": "three"}]
    enc = encode_messages(tok, messages, "assistant", template)
    trained = tok.decode([i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label != -100])
    assert trained == "three<|end|>" and enc.turns_without_eot == 0


def test_ollama_templates_of_llama3_and_mistral_are_translated_or_declined(tmp_path):
    """transformers 5 refuses to render an empty conversation, so a template writing bos before the messages (Llama 3)
    lost its Modelfile; Mistral's refusal of a system message killed the whole GGUF export with a TemplateError."""
    from finetune.export.modelfile import Untranslatable, template_parts

    llama3 = load_tokenizer(None, str(build_tokenizer(FAMILIES["llama3"], tmp_path / "l") and tmp_path / "l"))
    parts = template_parts(llama3)
    assert parts.start == "" and parts.wrap["user"] == ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    mistral = load_tokenizer(None, str(build_tokenizer(FAMILIES["mistral"], tmp_path / "m") and tmp_path / "m"))
    with pytest.raises(Untranslatable, match="the template refuses a system, user, assistant conversation"):
        template_parts(mistral)


def test_generation_stops_at_the_end_of_turn_token_when_it_is_not_eos(tmp_path, monkeypatch):
    """Gemma keeps <eos> as eos while its turns end with <end_of_turn>: generation ran on past the answer."""
    from finetune.data.templates import stop_ids
    from finetune.eval.tasks import generate_answers
    from finetune.export.generate import generate, load

    loaded = load(build("gemma2", tmp_path / "gemma"))
    tok = loaded.tokenizer
    want = [tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")]
    assert stop_ids(tok) == want
    seen = []
    real = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: seen.append(kw["eos_token_id"]) or real(**kw))
    generate(loaded, "What is 5 in words?", max_new_tokens=2, stream=False)
    generate_answers(loaded.model, tok, [[{"role": "user", "content": "What is 5 in words?"}]], max_new_tokens=2)
    assert seen == [want, want]
    tok.chat_template = None
    assert stop_ids(tok) == want[:1]


def test_gguf_accepts_the_nfc_normalizer_of_qwen_tokenizers_only():
    """transformers 5 loads Qwen2/2.5 tokenizers with an NFC normalizer: GGUF export refused the family it claims."""
    from finetune.export.gguf_vocab import pre_tokenizer_name

    data = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    assert pre_tokenizer_name({**data, "normalizer": {"type": "NFC"}}, "t") == "gpt-2"
    with pytest.raises(FinetuneError, match=r"tokenizers with a normalizer \(Lowercase\) are not written"):
        pre_tokenizer_name({**data, "normalizer": {"type": "Lowercase"}}, "t")


def test_validate_refuses_gguf_for_a_text_run_on_a_base_without_a_template(tmp_path):
    """A text run on a base without a chat template keeps having none (its exports invent none), and the GGUF check
    runs conversations: said by `ft validate`, not after training."""
    from finetune.export.support import family_lines
    from finetune.recipe.schema import Recipe

    base = tmp_path / "base"
    build_tokenizer(FAMILIES["gpt-neox"], base)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "The word for 1 is one."}) + "\n")
    lines = family_lines(Recipe(model={"name_or_path": str(base)}, data={"train": [{"path": str(text)}]}))
    assert lines[1] == ("#   ft export --format gguf: refused, a text run on a base model without a chat template "
                        "keeps having none, and the GGUF check runs conversations; instead: set data.template (e.g. "
                        "plain) to ship one, or --format merged")
    chosen = Recipe(model={"name_or_path": str(base)}, data={"train": [{"path": str(text)}], "template": "plain"})
    assert family_lines(chosen) == ["# model family: llama"]


def test_a_hub_source_is_not_opened_to_tell_whether_a_stage_is_text_only():
    from finetune.data.textonly import trains_on_text_only
    from finetune.recipe.schema import DataConfig

    assert not trains_on_text_only(DataConfig(train=[{"path": "someone/some-dataset"}]))  # nothing fetched
    assert trains_on_text_only(DataConfig(train=[{"path": "someone/some-dataset", "format": "text"}]))


def test_the_fixture_builder_command_writes_loadable_models(tmp_path, capsys):
    """`python scripts/build_fixture_models.py OUT [FAMILY ...]`, as the README shows it."""
    from build_fixture_models import main
    from transformers import AutoConfig

    main([str(tmp_path), "gpt2"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "gpt2")]
    assert AutoConfig.from_pretrained(str(tmp_path / "gpt2")).model_type == "gpt2"
    assert load_tokenizer(None, str(tmp_path / "gpt2")).pad_token == "<|pad|>"


def test_an_export_of_a_text_run_completes_raw_text_even_with_the_bases_template(tmp_path):
    """A text run on a base that has a chat template keeps that template; its exports say they were trained on text
    (export.json), and `ft generate` completes raw text with them by default."""
    from finetune.export.generate import load

    model = build("llama3", tmp_path / "m")
    assert not load(model).raw  # a chat model folder: through the template
    (model / "export.json").write_text(json.dumps({"format": "merged", "text_only": True}))
    assert load(model).raw
