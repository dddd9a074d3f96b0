"""`ft data preview`: what the model will be trained on, before any model is loaded.

Shows rendered samples with trained tokens marked apart from masked ones (colour on a terminal, «guillemets»
otherwise), token counts, the share of trained tokens, a length histogram, truncation counts, and checks that fail
the command: end-of-turn tokens carry labels, pad differs from eos. Rows whose messages hold special-token text are
counted (refused when the data is prepared, unless `data.special_tokens_in_content` escapes or allows them). Rows
with no assistant turn are refused
(naming their lines) when the data is prepared; samples masked entirely by truncation are counted and left out.
Data with tool calls, tool results or reasoning also gets what the chat template does with them (found by rendering
with and without each: `probe`), how many were trained and masked, and which reasoning the template dropped; rows
whose tools or calls the template would drop are refused when the data is prepared, naming their lines.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from finetune.data.build import DataReport, Prepared
from finetune.data.encode import IGNORE
from finetune.data.packing import unpack
from finetune.data.templates import TemplateInfo, render

OPEN, CLOSE = "«", "»"


def marked(tokenizer: Any, ids: list[int], labels: list[int], color: bool) -> str:
    """The sample's text with trained tokens marked: green on a terminal, between « and » otherwise."""
    import typer

    out, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or (labels[j] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False)
            if labels[start] != IGNORE:
                out.append(typer.style(text, fg=typer.colors.GREEN, bold=True) if color else f"{OPEN}{text}{CLOSE}")
            else:
                out.append(typer.style(text, dim=True) if color else text)
            start = j
    return "".join(out)


def histogram(lengths: Sequence[int], top: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram of sample lengths over [0, top]."""
    if not lengths:
        return []
    step = max(1, -(-(top + 1) // bins))  # buckets cover 0..top inclusive
    counts = [0] * bins
    for n in lengths:
        counts[min(n // step, bins - 1)] += 1
    peak = max(counts)
    return [f"  {i * step:>6}-{min((i + 1) * step - 1, top):<6} {'#' * round(width * c / peak):<{width}} {c}"
            for i, c in enumerate(counts)]


def shape_lines(report: DataReport, tokenizer: Any) -> list[str]:
    """Tool calls, tool results and reasoning of the data: counts, what was trained, what the template does."""
    stats = report.stats
    calls, results, given = stats.get("tool_calls", 0), stats.get("tool_results", 0), stats.get("reasoning_turns", 0)
    if not (calls or results or given):
        return []
    from finetune.data.probe import support

    if stats.get("trained_all"):  # data.train_on: all
        return [f"tool use: {calls} tool calls, {results} tool results, {given} assistant turns with reasoning: all "
                "trained, as every token (data.train_on: all; `assistant` masks the results)",
                *[f"template: {line}" for line in support(tokenizer).lines()]]
    lines = [f"tool use: {calls} tool calls (trained: they are the assistant's), {results} tool results (masked)"
             ] if calls or results else []
    if given:
        shown, trained = stats.get("reasoning_rendered", 0), stats.get("reasoning_trained", 0)
        lines.append(f"reasoning: {given} assistant turns carry it; {shown} rendered by the chat template"
                     + (f" ({given - shown} dropped by it)" if given > shown else "")
                     + f"; {trained} trained, {shown - trained} masked (data.train_on_reasoning)")
    return lines + [f"template: {line}" for line in support(tokenizer).lines()]


def checks(report: DataReport, tokenizer: Any, template: TemplateInfo) -> list[tuple[bool, str]]:
    """(passed, description) of each explicit check."""
    out = []
    if report.kind == "sft" and report.assistant_turns:
        bad, cut = report.turns_without_eot, getattr(report, "turns_cut", 0)
        lost = (f"; {cut} more lost it where truncation cut the turn off (the model does not learn to stop there: "
                "raise data.max_length or use length_policy: drop)" if cut else "")
        out.append((bad == 0 and template.end_of_turn is not None,
                    f"end-of-turn token {template.end_of_turn or '(none found)'} carries a label in every assistant "
                    f"turn ({report.assistant_turns - bad - cut}/{report.assistant_turns} kept it{lost})"))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out.append((pad is not None and pad != eos and pad != template.end_of_turn_id,
                f"pad token {tokenizer.pad_token} ({pad}) differs from eos {tokenizer.eos_token} ({eos}) and the "
                "end-of-turn token"))
    n, mode = report.stats.get("special_text", 0), getattr(report, "special_tokens", "refuse")
    out.append((True, f"{n} rows hold special-token text in messages, tokenized as "
                      f"{'plain text' if mode == 'escape' else 'control tokens'} ({mode})" if n else
                "no message holds special-token text (data.special_tokens_in_content: refuse names such rows)"))
    if report.kind == "sft":  # rows without an assistant turn are refused earlier, naming their lines
        n = report.dropped_fully_masked
        out.append((True, "no sample is fully masked" if n == 0 else
                    f"{n} samples kept no trained token within max_length (the prompt fills it) and were left out"))
    return out


def first_samples(dataset: Any, n: int) -> tuple[list[tuple[list[int], list[int]]], array]:
    """The first `n` (input_ids, labels) samples of an SFT dataset and the length of every sample, in one pass.

    Only the lengths of the rest are kept (4 bytes a sample): holding every sample as Python lists cost about 100
    bytes per token (3 GB of a 400k-row chat set in `ft train --dry-run`), where training stays flat.
    """
    first: list[tuple[list[int], list[int]]] = []
    lengths = array("I")
    for row in dataset:
        for ids, labels in unpack(row):
            if len(first) < n:
                first.append((ids, labels))
            lengths.append(len(ids))
    return first, lengths


def preview_lines(prepared: Prepared, tokenizer: Any, template: TemplateInfo, n: int, max_length: int,
                  color: bool) -> tuple[list[str], bool]:
    """The preview's lines and whether every check passed."""
    report, ds = prepared.report, prepared.dataset
    lines = [f"template: {template.source} (end-of-turn {template.end_of_turn}); {report.summary()}"]
    lines += [*shape_lines(report, tokenizer), ""]
    if report.kind == "dpo":
        for i in range(min(n, len(ds))):
            row = ds[i]
            prompt = render(tokenizer, row["prompt"], generation_prompt=True)
            lines.append(f"--- pair {i + 1} of {len(ds)}")
            lines.append(prompt)
            for side in ("chosen", "rejected"):
                text = render(tokenizer, row["prompt"] + row[side])[len(prompt):]
                count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                lines.append(f"  [{side}, {count} tokens] {text}")
            lines.append("")
    elif report.kind in ("kto", "grpo"):
        for i in range(min(n, len(ds))):
            row = ds[i]
            prompt = render(tokenizer, row["prompt"], generation_prompt=True)
            if report.kind == "kto":
                text = render(tokenizer, row["prompt"] + row["completion"])[len(prompt):]
                what = f"{'desirable' if row['label'] else 'undesirable'} answer"
            else:
                text, what = str(row.get("answer")), "reference answer (the policy samples its own)"
            lines += [f"--- {report.kind} row {i + 1} of {len(ds)}", prompt, f"  [{what}] {text}", ""]
    else:
        samples, lengths = first_samples(ds, n)
        for i, (ids, labels) in enumerate(samples):
            trained = sum(t != IGNORE for t in labels)
            lines.append(f"--- sample {i + 1} of {len(lengths)}: {len(ids)} tokens, {trained} trained "
                         f"({trained / max(len(ids), 1):.1%})")
            lines.append(marked(tokenizer, ids, labels, color))
            lines.append("")
        if not color:
            lines.append(f"{OPEN}...{CLOSE} marks trained tokens (they carry labels); the rest is masked (-100).")
        lines.append(f"lengths in tokens ({len(lengths)} samples, max_length {max_length}):")
        lines += histogram(lengths, max_length)
        lines.append(f"tokens: {report.tokens:,}, trained {report.trained_tokens:,} "
                     f"({report.trained_tokens / max(report.tokens, 1):.1%}); {report.truncated} truncated, "
                     f"{report.dropped_too_long} dropped as longer than max_length")
    lines.append("checks:")
    results = checks(report, tokenizer, template)
    lines += [f"  {'ok  ' if ok else 'FAIL'} {text}" for ok, text in results]
    return lines, all(ok for ok, _ in results)
