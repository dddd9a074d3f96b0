"""The shipped tiny chat model, its tokenizer and the quickstart data (fast, offline)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from finetune.eval.tasks import exact_match, generate_answers, normalize_answer, task_metrics

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny-chat"
DATA_DIR = ROOT / "data" / "quickstart"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)


def test_model_folder_is_small_and_quantisable(model):
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "tokenizer_config.json" in files
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 4.5e6
    assert model.config.model_type == "llama"
    assert model.config.hidden_size % 64 == 0 and model.config.intermediate_size % 64 == 0
    assert next(model.parameters()).dtype == torch.float32


def test_special_tokens(tokenizer, model):
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for token in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] < model.config.vocab_size
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_byte_fallback_round_trips_any_text(tokenizer):
    text = "Zürich ≠ 東京 🙂 tab\tnew\nline"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does Ana live?"},
        {"role": "assistant", "content": "Kasholm"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\n Be brief.<|im_end|>\n<|im_start|>user\n Where does Ana live?<|im_end|>\n"
        "<|im_start|>assistant\n Kasholm<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_assistant_mask_covers_exactly_the_replies(tokenizer):
    messages = [
        {"role": "user", "content": "Where does Ana live?"},
        {"role": "assistant", "content": "Kasholm"},
        {"role": "user", "content": "And her pet?"},
        {"role": "assistant", "content": "I think it is a cat."},
    ]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    kept = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept == " Kasholm<|im_end|> I think it is a cat.<|im_end|>"
    # Prompt tokens are a prefix of the full conversation's tokens (needed to split prompt and completion).
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])


def test_data_files_parse_and_stay_small(tokenizer):
    for name in ("sft_train", "sft_eval", "dpo_train", "dpo_eval"):
        assert (DATA_DIR / f"{name}.jsonl").stat().st_size < 1_000_000
    assert (DATA_DIR / "corpus.txt").stat().st_size < 2_000_000
    for row in _rows("sft_train") + _rows("sft_eval"):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] and row["answer"]
        assert normalize_answer(row["answer"]) in normalize_answer(row["messages"][1]["content"])
    for row in _rows("dpo_train") + _rows("dpo_eval"):
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["content"] == row["answer"] != row["rejected"][0]["content"]
    # Every word of the chat data is a known token sequence (no unknown token needed).
    sample = _rows("sft_train")[0]["messages"]
    assert tokenizer.unk_token_id not in tokenizer.apply_chat_template(sample, return_dict=True)["input_ids"]


def test_heldout_is_honest():
    """Held-out people never appear in chat-format training data; their facts are only stated in the corpus."""
    train_people = {r["entity"] for r in _rows("sft_train")} | {r["entity"] for r in _rows("dpo_train")}
    for name in ("sft_eval", "dpo_eval"):
        rows = _rows(name)
        assert len(rows) >= 100
        assert not train_people & {r["entity"] for r in rows}
    train_text = (DATA_DIR / "sft_train.jsonl").read_text(encoding="utf-8")
    assert not any(r["entity"] in train_text for r in _rows("sft_eval"))
    corpus = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert not any("?" in line or "<|im_" in line for line in corpus)
    for row in _rows("sft_eval")[:30]:
        assert any(row["entity"] in line and f" {row['answer']}" in line for line in corpus)
    # A third or so of SFT replies ramble (the behaviour DPO removes); the eval questions are plain.
    styles = [r["style"] for r in _rows("sft_train")]
    share, expected = styles.count("ramble") / len(styles), _make_data().RAMBLE_FRACTION
    assert abs(share - expected) <= 3 * (expected * (1 - expected) / len(styles)) ** 0.5  # the generator's share
    assert {r["style"] for r in _rows("sft_eval")} == {"concise"}


def _make_data():
    """scripts/make_data.py, the generator of the shipped data."""
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "scripts" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    return make_data


def test_shipped_data_matches_generator():
    make_data = _make_data()
    world = make_data.build_world()
    sft_train, sft_eval = make_data.make_sft(world)
    assert sft_eval == _rows("sft_eval") and sft_train[:50] == _rows("sft_train")[:50]


def test_exact_match_normalisation():
    assert normalize_answer("  The Violin. ") == "violin"
    assert normalize_answer("a  GREY\tcat!") == "grey cat"
    assert exact_match(["Kasholm.", "the harp", "blue-ish", "I think red"], ["kasholm", "Harp", "blue", "red"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_generation_restores_padding_side_and_mode(model, tokenizer):
    tokenizer.padding_side = "right"
    model.train()
    questions = ("Where does Ana live?", "Hi", "What is the occupation of Briix Numont?")
    prompts = [[{"role": "user", "content": q}] for q in questions]
    out = generate_answers(model, tokenizer, prompts, max_new_tokens=3, batch_size=3)
    assert tokenizer.padding_side == "right" and model.training
    # the batch is left-padded for generation: each answer is the one its prompt gets alone
    assert out == [generate_answers(model, tokenizer, [p], max_new_tokens=3)[0] for p in prompts]
    assert all(out)


def test_untrained_model_scores_zero_on_the_heldout_questions(model, tokenizer):
    """The shipped model was pretrained on statements only: asked about a held-out person, it goes on with a
    statement about that person (starting with the surname) instead of answering, so nothing matches yet; the
    README's "0.0% before" training."""
    model.eval()
    rows = _rows("sft_eval")[:4]
    metrics = task_metrics(model, tokenizer, rows, max_new_tokens=3, return_predictions=True)
    predictions = metrics.pop("predictions")
    assert [p.split()[0] for p in predictions] == [r["entity"].split()[-1] for r in rows]
    # three new tokens are at most three words: every answer counts as concise, none holds the answer
    assert metrics == {"exact_match": 0.0, "contains_answer": 0.0, "concise_rate": 1.0, "n": 4}
    assert exact_match(predictions, [r["answer"] for r in rows]) == 0.0
