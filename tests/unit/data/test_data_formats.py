"""Every SFT format gives exactly the expected token ids and labels on the tests' character-level tokenizer; the
registry templates render as documented and train each assistant turn with its end-of-turn token."""

from __future__ import annotations

import pytest

from finetune.data import apply_template, build_dataset
from finetune.errors import FinetuneError

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "ok"},
]
# The tests' tokenizer template (scripts/tiny_tokenizer.py CHATML): no newline between turns (Jinja trims it).
S, E = "<|im_start|>", "<|im_end|>"


def one(cfg, tok, row, path, write, **kw):
    data = cfg(write(path, [row]), **kw)
    apply_template(tok, data)
    ds = build_dataset(data, tok, "sft", seed=0)
    assert len(ds) == 1
    return ds[0]["input_ids"], ds[0]["labels"]


@pytest.mark.parametrize(
    "row, marked",
    [
        pytest.param({"messages": SYSTEM_CHAT},
                     f"{S}system\nBe brief{E}{S}user\nhi{E}{S}assistant\n«yo{E}»{S}user\nand?{E}{S}assistant\n«ok{E}»",
                     id="messages-multiturn-system"),
        pytest.param({"instruction": "Add", "input": "1 2", "output": "3"},
                     f"{S}user\nAdd\n\n1 2{E}{S}assistant\n«3{E}»", id="alpaca"),
        pytest.param({"instruction": "Hi", "input": "", "output": "yo", "system": "Sys"},
                     f"{S}system\nSys{E}{S}user\nHi{E}{S}assistant\n«yo{E}»", id="alpaca-no-input-system"),
        pytest.param({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                                        {"from": "gpt", "value": "yo"}, {"from": "human", "value": "x"},
                                        {"from": "gpt", "value": "z"}]},
                     f"{S}system\nS{E}{S}user\nhi{E}{S}assistant\n«yo{E}»{S}user\nx{E}{S}assistant\n«z{E}»",
                     id="sharegpt"),
        pytest.param({"prompt": "2+2?", "completion": "4"}, f"{S}user\n2+2?{E}{S}assistant\n«4{E}»",
                     id="prompt-completion-strings"),
        pytest.param({"prompt": [{"role": "user", "content": "q"}],
                      "completion": [{"role": "assistant", "content": "a"}]},
                     f"{S}user\nq{E}{S}assistant\n«a{E}»", id="prompt-completion-messages"),
        pytest.param({"text": "Hello"}, f"«Hello{E}»", id="text-eos-appended"),
    ],
)
def test_exact_ids_and_labels(cfg, tok, expect, write, row, marked):
    assert one(cfg, tok, row, "d.jsonl", write) == expect(marked)


def test_train_on_all_labels_every_token(cfg, tok, expect, write):
    ids, labels = one(cfg, tok, {"messages": SYSTEM_CHAT[1:3]}, "d.jsonl", write, train_on="all")
    assert (ids, labels) == expect(f"«{S}user\nhi{E}{S}assistant\nyo{E}»")


def test_assistant_turn_containing_eot_text_is_still_masked_right(cfg, tok, expect, write):
    # The answer itself spells the end-of-turn token: masks come from template spans, not from searching tokens
    # (with data.special_tokens_in_content: allow; the default refuses the row, tests/unit/data/test_special_text.py).
    row = {"messages": [{"role": "user", "content": "say <|im_end|>"},
                        {"role": "assistant", "content": "A<|im_end|>B"}]}
    assert one(cfg, tok, row, "d.jsonl", write, special_tokens_in_content="allow") == expect(
        f"{S}user\nsay {E}{E}{S}assistant\n«A{E}B{E}»")


CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize(
    "name, marked, eot",
    [
        ("chatml", f"{S}system\nS{E}\n{S}user\nhi{E}\n{S}assistant\n«yo{E}»\n{S}user\nand?{E}\n{S}assistant\n"
         f"«ok{E}»\n", "<|im_end|>"),
        ("llama-3", "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
         "\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n«yo<|eot_id|>»<|start_header_id|>user"
         "<|end_header_id|>\n\nand?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n«ok<|eot_id|>»",
         "<|eot_id|>"),
        ("mistral", f"[INST] S\n\nhi [/INST]«yo{E}»[INST] and? [/INST]«ok{E}»", "<|im_end|>"),
        ("gemma", "<start_of_turn>user\nS\n\nhi<end_of_turn>\n<start_of_turn>model\n«yo<end_of_turn>»\n"
         "<start_of_turn>user\nand?<end_of_turn>\n<start_of_turn>model\n«ok<end_of_turn>»\n", "<end_of_turn>"),
        ("phi-3", "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n«yo<|end|>»\n<|user|>\nand?<|end|>\n"
         "<|assistant|>\n«ok<|end|>»\n", "<|end|>"),
        ("plain", f"### System:\nS\n\n### User:\nhi\n\n### Assistant:\n«yo{E}»\n\n### User:\nand?\n\n### Assistant:\n"
         f"«ok{E}»\n\n", "<|im_end|>"),
    ],
)
def test_registry_templates(cfg, tok, expect, write, name, marked, eot):
    data = cfg(write("d.jsonl", [{"messages": CONV}]), template=name)
    info = apply_template(tok, data)
    assert info.end_of_turn == eot and tok.eos_token == eot  # generation stops where the template ends a turn
    assert tok.pad_token_id != tok.eos_token_id
    ds = build_dataset(data, tok, "sft", seed=0)
    assert (ds[0]["input_ids"], ds[0]["labels"]) == expect(marked)
    assert apply_template(tok, data).notices == []  # a second call changes nothing


def test_registry_template_adds_missing_tokens_with_a_notice(tok, cfg, capsys):
    before = len(tok)
    info = apply_template(tok, cfg("x.jsonl", template="llama-3"))
    assert len(tok) == before + 3
    assert any("modules_to_save" in n for n in info.notices)
    assert "eos token set to <|eot_id|>" in capsys.readouterr().out


def test_base_model_without_template_gets_one_with_a_notice(tok, cfg, capsys):
    tok.chat_template = None
    info = apply_template(tok, cfg("x.jsonl"))
    assert info.source == "chatml" and tok.chat_template  # the char vocabulary has the ChatML tokens
    assert "has no chat template" in capsys.readouterr().out


def test_jinja_file_template(tok, cfg, expect, write, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                     "<|endoftext|>{% endif %}{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    data = cfg(write("d.jsonl", [{"messages": CONV[1:3]}]), template=str(jinja))
    info = apply_template(tok, data)
    assert info.end_of_turn == "<|endoftext|>"
    ds = build_dataset(data, tok, "sft", seed=0)
    assert (ds[0]["input_ids"], ds[0]["labels"]) == expect("u:hia:«yo<|endoftext|>»")


def test_template_without_end_of_turn_token_fails(tok, cfg, write, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    data = cfg(write("d.jsonl", [{"messages": CONV[1:3]}]), template=str(jinja))
    apply_template(tok, data)
    with pytest.raises(FinetuneError, match="1 of 1 assistant turns end without a trained end-of-turn token"):
        build_dataset(data, tok, "sft", seed=0)


def test_pad_equal_to_end_of_turn_is_refused(tok, cfg):
    tok.pad_token = "<|eot_id|>"
    with pytest.raises(FinetuneError, match="pad token <\\|eot_id\\|> is the end-of-turn token"):
        apply_template(tok, cfg("x.jsonl", template="llama-3"))


def test_template_that_rewrites_earlier_turns_is_reported_with_rows(tok, cfg, write, tmp_path):
    # Renders only the last assistant message in full: rendering prefix by prefix breaks, masks would be wrong.
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}<|im_start|>{% if loop.last %}{{ m['content'] }}{% else %}...{% endif %}"
                     "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    data = cfg(write("d.jsonl", [{"messages": CONV[1:]}]), template=str(jinja))
    apply_template(tok, data)
    expected = (r"(?s)d.jsonl': rows the chat template cannot encode\n"
                r"  1 row: rendered by the chat template differently.*\(line 1\)")
    with pytest.raises(FinetuneError, match=expected):
        build_dataset(data, tok, "sft", seed=0)


def test_auto_detection_is_reported_and_column_mapping_applies(tok, cfg, expect, write, capsys):
    path = write("qa.jsonl", [{"question": "Q", "answer": "A"}])
    data = cfg({"path": str(path), "columns": {"instruction": "question", "output": "answer"}})
    apply_template(tok, data)
    ds = build_dataset(data, tok, "sft", seed=0)
    assert (ds[0]["input_ids"], ds[0]["labels"]) == expect(f"{S}user\nQ{E}{S}assistant\n«A{E}»")
    assert "detected format 'alpaca'" in capsys.readouterr().out


def test_tokenizers_without_offsets_get_the_same_masks(cfg, tok, expect, write):
    class NoOffsets:  # like Python or mistral-common tokenizers: no offset mapping
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            if kw.get("return_offsets_mapping"):
                raise ValueError("offsets are not supported")
            return self.inner(text, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    from finetune.data.encode import encode_messages
    from finetune.data.templates import applied_template

    data = cfg("x.jsonl")
    apply_template(tok, data)
    sample = encode_messages(NoOffsets(tok), SYSTEM_CHAT, "assistant", applied_template(tok, data))
    expected = f"{S}system\nBe brief{E}{S}user\nhi{E}{S}assistant\n«yo{E}»{S}user\nand?{E}{S}assistant\n«ok{E}»"
    assert (sample.input_ids, sample.labels) == expect(expected)
    assert sample.assistant_turns == 2 and sample.turns_without_eot == 0
