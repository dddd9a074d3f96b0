"""Likelihood figures of a model: held-out loss, forgetting against a base, preference margins, choice scores.

A model enters here as a `Forward`: a function of `(input_ids, attention_mask)` returning next-token scores: a
`Scores` (the last hidden states and the LM head, whose logits are formed for the positions asked, a chunk at a time)
or, for models whose logits are more than `hidden @ head` (soft-capping, scaled or adapted heads) and for a caller's
own function, the logits tensor itself. So a batch never holds `tokens x vocabulary` logits at once (a 32k-token row
of a 152k vocabulary would be 19 GB in float32): at most `CHUNK_LOGITS` of them. `forward` makes one of a model;
`adapter_off` makes the base model's of a peft model (its adapter disabled for the call), so forgetting needs no
second copy of the base in memory. Batches are right-padded; padding never counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from finetune.data.encode import IGNORE
from finetune.errors import FinetuneError

CHUNK_LOGITS = 2**24  # logits formed at once (64 MB in float32)


class Scores:
    """A batch's next-token scores: its last hidden states and the LM head, logits formed only where asked."""

    def __init__(self, hidden: torch.Tensor, head: torch.nn.Module):
        self.hidden, self.head = hidden, head
        self.vocab = head.weight.shape[0]

    @torch.no_grad()
    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float32 logits `[n, vocab]` at positions (rows[i], cols[i])."""
        picked = self.hidden[rows.to(self.hidden.device), cols.to(self.hidden.device)]
        return self.head(picked.to(self.head.weight.dtype)).float().cpu()


Forward = Callable[[torch.Tensor, torch.Tensor], "Scores | torch.Tensor"]
Sample = tuple[list[int], list[int]]  # token ids, labels (IGNORE where no loss)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward(model: torch.nn.Module, adapter: bool = True) -> Forward:
    """The scores function of `model`; with `adapter=False` a peft model's adapter is disabled during the call."""
    from finetune.model.loss_heads import logit_transform

    device = _device(model)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the logits are exactly `hidden @ head` (+ bias): a plain Linear head (not adapted), no transform after it
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    by_position = type(head) is torch.nn.Linear and hasattr(lm, "base_model") and logit_transform(lm.config) is None

    @torch.no_grad()
    def run(ids: torch.Tensor, mask: torch.Tensor) -> Scores | torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with nullcontext() if adapter else model.disable_adapter():
                if by_position:
                    hidden = lm.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           use_cache=False).last_hidden_state
                    return Scores(hidden, head)
                return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        finally:
            model.train(was_training)

    return run


def _vocab(out: Scores | torch.Tensor) -> int:
    return out.vocab if isinstance(out, Scores) else out.shape[-1]


def _chunks(out: Scores | torch.Tensor, where: torch.Tensor, columns: int | None = None, vocab: int | None = None):
    """(rows, cols, float32 logits [n, vocab or `columns`]) at the labelled positions `where`, a chunk at a time.

    `vocab` sizes the chunks (default: `out`'s); two models compared position by position pass the larger of theirs,
    so that both are cut at the same positions."""
    rows, cols = where.nonzero(as_tuple=True)
    step = max(1, CHUNK_LOGITS // (vocab or _vocab(out)))
    for start in range(0, len(rows), step):
        r, c = rows[start:start + step], cols[start:start + step]
        logits = out.at(r, c) if isinstance(out, Scores) else out[r, c].float()
        yield r, c, logits if columns is None else logits[:, :columns]


def adapter_off(model: torch.nn.Module) -> Forward | None:
    """The base model's logits function of a peft model (adapter disabled), or None for a plain model."""
    return forward(model, adapter=False) if hasattr(model, "disable_adapter") else None


def adapter_off_words(model: torch.nn.Module) -> str:
    """Which base `adapter_off` compares with, in words: 'the nf4 4-bit base the adapter was trained on, ...'."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    q = q if isinstance(q, dict) or q is None else q.to_dict()
    quant = q.get("bnb_4bit_quant_type", "nf4") if q and q.get("load_in_4bit") else None
    return f"the {quant + ' 4-bit ' if quant else ''}base the adapter was trained on, adapter disabled"


def _batches(samples: list[Sample], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            ids[row, : len(i)], labels[row, : len(lab)], mask[row, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        yield ids, labels, mask


def _token_logprobs(out: Scores | torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label under `out`, and where a label is (both [batch, length - 1])."""
    target = labels[:, 1:]
    where = target != IGNORE
    logp = torch.zeros(where.shape)
    for r, c, logits in _chunks(out, where):
        logp[r, c] = torch.log_softmax(logits, dim=-1).gather(-1, target[r, c].unsqueeze(-1)).squeeze(-1)
    return logp, where


def label_logprobs(fwd: Forward, samples: list[Sample], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log-probabilities, number) of each sample's labelled tokens."""
    out = []
    for ids, labels, mask in _batches(samples, batch_size, pad_id):
        logp, where = _token_logprobs(fwd(ids, mask), labels)
        out += list(zip(logp.sum(-1).tolist(), where.sum(-1).tolist(), strict=True))
    return out


def mean_loss(scored: list[tuple[float, int]]) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood and its perplexity."""
    tokens = sum(n for _, n in scored)
    loss = -sum(s for s, _ in scored) / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens}


def compare(tuned: Forward, base: Forward, samples: list[Sample], pad_id: int,
            batch_size: int = 16) -> dict[str, float]:
    """Forgetting on labelled tokens: both models' mean loss, its change, and the mean KL(base || tuned) per token.

    The KL is taken between the two next-token distributions at every labelled position, in nats. When one model's
    output layer is wider (a vocabulary padded to a multiple of 64, or rows added for new tokens), both are compared
    on the common vocabulary, the first rows of both, each distribution renormalised over them; `common_vocab`
    then says how many rows that was. Labels outside it raise a FinetuneError.
    """
    sums = {"tuned": 0.0, "base": 0.0, "kl": 0.0}
    tokens, common = 0, None
    for ids, labels, mask in _batches(samples, batch_size, pad_id):
        out_t, out_b = tuned(ids, mask), base(ids, mask)
        columns = None
        if _vocab(out_t) != _vocab(out_b):
            common = columns = min(_vocab(out_t), _vocab(out_b))
            if int(labels.max()) >= common:
                raise FinetuneError(f"the two models share only the first {common} vocabulary rows, and the text "
                                    f"holds token {int(labels.max())}; they cannot be compared token by token")
        target = labels[:, 1:]
        where = target != IGNORE
        widest = max(_vocab(out_t), _vocab(out_b))
        for (r, c, logits_t), (_, _, logits_b) in zip(_chunks(out_t, where, columns, widest),
                                                      _chunks(out_b, where, columns, widest), strict=True):
            lt, lb = torch.log_softmax(logits_t, -1), torch.log_softmax(logits_b, -1)
            picked = target[r, c].unsqueeze(-1)
            sums["tuned"] -= lt.gather(-1, picked).sum().item()
            sums["base"] -= lb.gather(-1, picked).sum().item()
            sums["kl"] += (lb.exp() * (lb - lt)).sum().item()
        tokens += int(where.sum())
    if not tokens:
        return {"tokens": 0}
    tuned_loss, base_loss = sums["tuned"] / tokens, sums["base"] / tokens
    out = {"loss": tuned_loss, "base_loss": base_loss, "loss_change": tuned_loss - base_loss,
           "mean_kl": sums["kl"] / tokens, "tokens": tokens}
    return out if common is None else {**out, "common_vocab": common}


def preference(fwd: Forward, chosen: list[Sample], rejected: list[Sample], pad_id: int,
               reference: Forward | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Preference accuracy and margins: how much likelier each chosen answer is than its rejected one.

    `margin` is log p(chosen) - log p(rejected) of the whole answers; `accuracy` the share of pairs with a positive
    margin. With a reference (the base, for a tuned model), `reward_margin` is the margin minus the reference's
    margin (DPO's implicit reward difference without beta) and `reward_accuracy` the share where it is positive.
    """
    def margins(f: Forward) -> list[float]:
        c, r = label_logprobs(f, chosen, pad_id, batch_size), label_logprobs(f, rejected, pad_id, batch_size)
        return [a[0] - b[0] for a, b in zip(c, r, strict=True)]

    mine = margins(fwd)
    n = len(mine)
    out: dict[str, Any] = {"pairs": n, "accuracy": sum(m > 0 for m in mine) / n if n else 0.0,
                           "margin": sum(mine) / n if n else 0.0}
    if reference is not None and n:
        rewards = [m - r for m, r in zip(mine, margins(reference), strict=True)]
        out.update(reward_accuracy=sum(x > 0 for x in rewards) / n, reward_margin=sum(rewards) / n)
    return out


def choice_scores(fwd: Forward, choices: list[list[Sample]], pad_id: int, batch_size: int = 16) -> list[list[float]]:
    """Sum log-probability of each choice of each row (the answer tokens given the prompt)."""
    flat = [s for row in choices for s in row]
    scored = [s for s, _ in label_logprobs(fwd, flat, pad_id, batch_size)]
    out, start = [], 0
    for row in choices:
        out.append(scored[start : start + len(row)])
        start += len(row)
    return out
