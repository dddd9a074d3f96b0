"""Scoring (held-out loss, forgetting, preference, choices) never forms `tokens x vocabulary` logits at once: a model's
scores are its last hidden states and its head, logits formed for the labelled positions a chunk at a time; the
figures equal those of the full logits."""

from __future__ import annotations

import torch

from finetune.data.encode import IGNORE
from finetune.eval import scoring


def _model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _samples(n=5, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 100, (length - i,), generator=g).tolist()
        out.append((ids, [IGNORE] * 10 + ids[10:]))
    return out


def test_scores_by_position_equal_full_logits_and_stay_in_chunks(tiny_model, monkeypatch):
    model = _model(tiny_model)
    full = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits.float()  # noqa: E731
    fwd = scoring.forward(model)
    samples = _samples()
    ids, labels, mask = next(scoring._batches(samples, 16, 0))
    assert isinstance(fwd(ids, mask), scoring.Scores)
    want = scoring.label_logprobs(full, samples, 0)
    formed = []
    original = scoring.Scores.at

    def counted(self, rows, cols):
        logits = original(self, rows, cols)
        formed.append(logits.shape)
        return logits

    monkeypatch.setattr(scoring.Scores, "at", counted)
    monkeypatch.setattr(scoring, "CHUNK_LOGITS", 8 * model.config.vocab_size)  # 8 positions a chunk
    got = scoring.label_logprobs(fwd, samples, 0)
    for (a, n), (b, m) in zip(got, want, strict=True):
        assert n == m and abs(a - b) < 1e-4
    labelled = sum(sum(t != IGNORE for t in lab[1:]) for _, lab in samples)
    assert sum(s[0] for s in formed) == labelled and max(s[0] for s in formed) == 8
    forgetting = scoring.compare(fwd, full, samples, 0)
    assert forgetting["tokens"] == labelled and abs(forgetting["mean_kl"]) < 1e-6
    assert abs(forgetting["loss_change"]) < 1e-6


def test_models_whose_logits_are_more_than_hidden_times_head_keep_the_full_logits(tiny_model):
    model = _model(tiny_model)
    model.config.final_logit_softcapping = 30.0
    ids, _, mask = next(scoring._batches(_samples(2), 16, 0))
    out = scoring.forward(model)(ids, mask)
    assert isinstance(out, torch.Tensor) and out.shape == (*ids.shape, model.config.vocab_size)


def test_models_with_different_vocabularies_are_cut_at_the_same_positions(monkeypatch):
    """A padded vocabulary against the plain one: both models' chunks cover the same positions, so the figures equal
    those of one chunk (the chunk size is the wider vocabulary's)."""
    g = torch.Generator().manual_seed(1)
    vocab, padded = 100, 164
    base_logits = torch.randn(2, 30, vocab, generator=g)
    tuned_logits = torch.cat([base_logits + 0.1 * torch.randn(2, 30, vocab, generator=g),
                              torch.randn(2, 30, padded - vocab, generator=g)], -1)
    samples = _samples(2, 30)
    samples = [([t % vocab for t in ids], [t % vocab if t != IGNORE else t for t in lab]) for ids, lab in samples]
    tuned = lambda ids, mask: tuned_logits[:, :ids.shape[1]]  # noqa: E731
    base = lambda ids, mask: base_logits[:, :ids.shape[1]]  # noqa: E731
    whole = scoring.compare(tuned, base, samples, 0)
    monkeypatch.setattr(scoring, "CHUNK_LOGITS", 8 * vocab)  # 8 positions of the plain vocabulary, 4 of the padded
    chunked = scoring.compare(tuned, base, samples, 0)
    assert chunked["common_vocab"] == vocab and chunked["tokens"] == whole["tokens"]
    for key in ("loss", "base_loss", "mean_kl"):
        assert abs(chunked[key] - whole[key]) < 1e-5, key
