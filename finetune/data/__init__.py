"""Data: read rows, normalise their format, render them with the chat template, mask labels, pack, cache.

Stages use two functions and never look at raw rows:

    info = apply_template(tokenizer, data)                  # the recipe's chat template on the tokenizer
    train = build_dataset(data, tokenizer, "sft", seed, "train")

Modules: `readers` (files, folders, save_to_disk, Hub), `formats` (detection, column mapping, normalisation),
`templates` (registry, apply_template), `encode` (ids and label masks), `packing`, `cache`, `build` (the steps in
order), `preview` (the lines `ft data preview` prints). Importing this package is cheap: datasets and transformers load
on use. May import `finetune.recipe` and `finetune.distributed`; knows no model.
"""

from __future__ import annotations

from typing import Any

from finetune.data.encode import IGNORE
from finetune.data.templates import TEMPLATE_NAMES, TemplateInfo, apply_template
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig, DatasetSource

__all__ = ["IGNORE", "TEMPLATE_NAMES", "TemplateInfo", "apply_template", "build_dataset", "read_rows"]


def read_rows(src: DatasetSource, key: str = "data") -> list[dict[str, Any]]:
    """The raw rows of one source (any supported kind of source), with its column mapping applied, in file order.

    For tools that need the rows themselves (e.g. export verification); training goes through `build_dataset`.
    """
    from finetune.data.formats import apply_columns
    from finetune.data.readers import read_source

    table = read_source(src, key)
    apply_columns(table, src.columns)
    return table.rows[: src.max_samples] if src.max_samples else table.rows


def build_dataset(data: DataConfig, tokenizer: Any, kind: str, seed: int, split: str = "train"):
    """The preprocessed `datasets.Dataset` of a stage's split, or None when the split has no data.

    Args:
        data: The stage's data section.
        tokenizer: The tokenizer, after `apply_template(tokenizer, data)`.
        kind: `sft`: columns `input_ids` and `labels` (-100 where no loss), plus `seq_lengths` for packed training
            rows (`data.packing`; train the dataset with trl's padding-free collator). `dpo`: trl's conversational
            preference format, columns `prompt`, `chosen`, `rejected`, each a list of {role, content} messages.
        seed: The recipe seed.
        split: `train` or `eval`.

    Raises:
        FinetuneError: Bad or missing data (the message names the file, rows and fix), or a chat template that does
            not end assistant turns with a token the model can learn to stop on.
    """
    from finetune.data.build import prepare

    apply_template(tokenizer, data)  # idempotent; stages call it first themselves (before the model loads)
    prepared = prepare(data, tokenizer, kind, seed, split)
    if prepared is None:
        return None
    report = prepared.report
    print(report.summary(), flush=True)
    if report.turns_without_eot:
        raise FinetuneError(
            f"data ({split}): {report.turns_without_eot} of {report.assistant_turns} assistant turns end without a "
            f"trained end-of-turn token (template '{report.template}', end-of-turn "
            f"{report.end_of_turn or 'not found'}): the model would never learn to stop. Use a template that closes "
            "assistant turns with a special token (data.template: chatml, llama-3, ...). `ft data preview` shows it."
        )
    return prepared.dataset
