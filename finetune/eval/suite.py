"""What `ft eval` measures on one model: read and check every file first (`load_suite`), then score (`evaluate`).

From the recipe and a stage: the held-out loss and perplexity of the stage's `data.eval` (SFT rows), the task
metrics of `data.task_eval` (exact match, contains-answer) and of every `eval.tasks` file (its own metrics), the
preference accuracy and margins of a dpo stage's eval pairs and of `eval.preference` files, and forgetting on
`eval.general_text` (loss change against the base and mean KL(base || tuned) per token, when a base is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import FinetuneError
from finetune.eval import metrics as M
from finetune.eval import scoring
from finetune.eval.taskrows import load_task_file, read_general_text
from finetune.recipe.schema import DatasetSource, Recipe, StageConfig, TaskFile


@dataclass
class TaskSet:
    """One task file, its metrics and its (checked) rows."""

    path: str
    metrics: list[str]
    rows: list[dict[str, Any]]
    pattern: str | None = None


@dataclass
class Suite:
    """Everything `evaluate` scores, read and checked before any model loads."""

    heldout: list[dict[str, Any]] = field(default_factory=list)  # {"messages": [...]} and {"text": ...} rows
    tasks: list[TaskSet] = field(default_factory=list)
    preference: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file -> {prompt, chosen, rejected}
    general: list[str] = field(default_factory=list)
    general_path: str | None = None
    max_forgetting: float | None = None
    train_on: str = "assistant"
    max_new_tokens: int = 24
    max_length: int = 1024


def _table(src: DatasetSource, key: str):
    from finetune.data.formats import apply_columns
    from finetune.data.readers import read_source

    table = read_source(src, key)
    apply_columns(table, src.columns)
    return table


def load_suite(recipe: Recipe, stage: StageConfig) -> Suite:
    """Read and check every file the recipe names for evaluation of `stage`; raise FinetuneError naming the file."""
    from finetune.data.formats import normalize_preference, normalize_sft, resolve_format

    data, cfg, limit = recipe.stage_data(stage), recipe.eval, recipe.eval.max_rows
    suite = Suite(max_forgetting=cfg.max_forgetting, train_on=data.train_on,
                  max_new_tokens=data.task_eval_max_new_tokens, max_length=data.max_length)
    for i, src in enumerate(data.eval):
        table = _table(src, f"data.eval[{i}]")
        fmt, _ = resolve_format(table, src.format)
        if fmt == "preference":
            suite.preference[src.path] = normalize_preference(table)[:limit]
        else:
            suite.heldout += normalize_sft(table, fmt)[:limit]  # chat rows and text rows, as training scored them
    files = [TaskFile(path=data.task_eval)] if data.task_eval else []
    for task in files + list(cfg.tasks):
        rows = load_task_file(task.path, "task file", list(task.metrics), task.pattern, task.max_rows or limit)
        suite.tasks.append(TaskSet(task.path, list(task.metrics), rows, task.pattern))
    for i, path in enumerate(cfg.preference):
        pairs = normalize_preference(_table(DatasetSource(path=path, format="preference"), f"eval.preference[{i}]"))
        suite.preference[path] = pairs[:limit]
    if cfg.general_text:
        suite.general, suite.general_path = read_general_text(cfg.general_text, limit), cfg.general_text
    return suite


def _encode(tokenizer, template, messages: list[dict[str, str]], train_on: str, max_length: int) -> scoring.Sample:
    from finetune.data.encode import encode_messages

    enc = encode_messages(tokenizer, messages, train_on, template)
    return enc.input_ids[:max_length], enc.labels[:max_length]


def _text_sample(tokenizer, text: str, max_length: int) -> scoring.Sample:
    ids = tokenizer(text)["input_ids"][:max_length]
    return ids, list(ids)


def heldout_samples(tokenizer, template, suite: Suite) -> tuple[list[scoring.Sample], dict[str, int]]:
    """The held-out rows as samples, as training encoded them (chat rows masked by `train_on`, text rows with every
    token labelled), without those left with no labelled token; and the counts of each kind."""
    from finetune.data.encode import IGNORE, encode_text

    samples, counts = [], {"chat": 0, "text": 0, "skipped_no_labels": 0}
    for row in suite.heldout:
        if "messages" in row:
            sample, kind = _encode(tokenizer, template, row["messages"], suite.train_on, suite.max_length), "chat"
        else:
            enc = encode_text(tokenizer, row["text"])
            sample, kind = (enc.input_ids[: suite.max_length], enc.labels[: suite.max_length]), "text"
        if all(label == IGNORE for label in sample[1][1:]):  # the first label predicts nothing
            counts["skipped_no_labels"] += 1
            continue
        counts[kind] += 1
        samples.append(sample)
    return samples, counts


def heldout_loss(fwd, tokenizer, template, suite: Suite, pad: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Held-out loss and perplexity over the chat and text rows of `data.eval`, saying what it scored and skipped."""
    samples, counts = heldout_samples(tokenizer, template, suite)
    skipped = counts["skipped_no_labels"]
    say(f"  heldout: {counts['chat']} chat rows, {counts['text']} text rows"
        + (f"; skipped {skipped} rows with no trained token within max_length {suite.max_length}" if skipped else ""))
    if not samples:
        raise FinetuneError(f"data.eval: none of its {len(suite.heldout)} rows has a trained token within "
                            f"max_length {suite.max_length}; nothing to score")
    return {**scoring.mean_loss(scoring.label_logprobs(fwd, samples, pad)), "rows": counts}


def general_samples(tokenizer, suite: Suite) -> list[scoring.Sample]:
    """The general-text documents as samples with every token labelled."""
    return [_text_sample(tokenizer, doc, suite.max_length) for doc in suite.general]


def run_tasks(model, tokenizer, template, task: TaskSet, suite: Suite, fwd: scoring.Forward | None = None,
              batch_size: int = 32, answered: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The metrics of one task file (greedy answers for the generated ones, choice scores for choice_accuracy).

    `answered` keeps the greedy answers per file, so that a file named twice (data.task_eval and eval.tasks) is
    generated once.
    """
    from finetune.eval.tasks import _prompt_of, generate_answers

    out: dict[str, Any] = {"rows": len(task.rows)}
    generated = [m for m in task.metrics if m in M.GENERATED]
    if generated:
        answered = {} if answered is None else answered
        known = answered.get(task.path, [])
        if len(known) < len(task.rows):
            known = answered[task.path] = generate_answers(
                model, tokenizer, [_prompt_of(r) for r in task.rows], suite.max_new_tokens, batch_size)
        predictions = known[: len(task.rows)]
        out.update(M.score_generated(generated, predictions, task.rows, task.pattern))
        out["examples"] = [{"prompt": _prompt_of(r)[-1]["content"], "answer": str(r["answer"]), "prediction": p}
                           for r, p in zip(task.rows[:3], predictions[:3], strict=False)]
    if "choice_accuracy" in task.metrics:
        fwd = fwd or scoring.forward(model)
        choices = [[_encode(tokenizer, template, [*_prompt_of(r), {"role": "assistant", "content": str(c)}],
                            "assistant", suite.max_length) for c in r["choices"]] for r in task.rows]
        scores = scoring.choice_scores(fwd, choices, tokenizer.pad_token_id or 0)
        out["choice_accuracy"] = M.choice_accuracy(scores, [M.gold_index(r) for r in task.rows])
    return out


def evaluate(model, tokenizer, template, suite: Suite, base: scoring.Forward | None = None,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `model` on the suite; with `base` (the base model's logits function) also forgetting and rewards.

    Returns:
        `{"heldout": {loss, perplexity, tokens}, "tasks": {file: {metric: value}}, "preference": {file: {...}},
        "forgetting": {loss, base_loss, loss_change, mean_kl, tokens, over_limit}, "seconds": {...}}`, each part
        present when the suite has its data.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fwd = scoring.forward(model)
    out: dict[str, Any] = {"seconds": {}}

    def timed(name: str, what: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = what()
        out["seconds"][name] = round(time.perf_counter() - started, 2)
        say(f"  {name}: done in {out['seconds'][name]:.1f} s")
        return result

    if suite.heldout:
        out["heldout"] = timed("heldout", lambda: heldout_loss(fwd, tokenizer, template, suite, pad, say))
    if suite.tasks:
        out["tasks"], answered = {}, {}
        for task in suite.tasks:
            figures = timed(f"task {task.path}",
                            lambda t=task: run_tasks(model, tokenizer, template, t, suite, fwd, answered=answered))
            out["tasks"].setdefault(task.path, {}).update(figures)
    if suite.preference:
        out["preference"] = {}
        for path, pairs in suite.preference.items():
            chosen = [_encode(tokenizer, template, p["prompt"] + p["chosen"], "assistant", suite.max_length)
                      for p in pairs]
            rejected = [_encode(tokenizer, template, p["prompt"] + p["rejected"], "assistant", suite.max_length)
                        for p in pairs]
            out["preference"][path] = timed(f"preference {path}",
                                            lambda c=chosen, r=rejected: scoring.preference(fwd, c, r, pad, base))
    if suite.general and base is not None:
        samples = general_samples(tokenizer, suite)
        figures = timed("forgetting", lambda: scoring.compare(fwd, base, samples, pad))
        figures["file"] = suite.general_path
        if suite.max_forgetting is not None and "loss_change" in figures:
            figures["max_forgetting"] = suite.max_forgetting
            figures["over_limit"] = figures["loss_change"] > suite.max_forgetting
        out["forgetting"] = figures
    elif suite.general:
        samples = general_samples(tokenizer, suite)
        out["general"] = timed("general text", lambda: scoring.mean_loss(scoring.label_logprobs(fwd, samples, pad)))
    return out
