"""Is a stage continued pretraining? True when every training source holds plain `text` rows (no conversations).

Such a run never sees a chat template: its saved tokenizer and its exports keep the base's (none, for a base model)
instead of one invented for training, and `ft generate` completes raw text for it.
"""

from __future__ import annotations

from finetune.recipe.schema import DataConfig


def _first_row_format(src, key: str) -> str:
    from finetune.data import formats
    from finetune.data.readers import Table
    from finetune.data.stream import open_with_first_row

    _, first = open_with_first_row(src, key)  # nothing read but the first row
    return formats.resolve_format(Table(key, src.path, [first], [(src.path, "row 1")]), "auto")[0]


def trains_on_text_only(data: DataConfig) -> bool:
    """True when the stage's every training source is `text` (by its `format`, or detected from the first row of a
    local source; a Hub source must say `format: text`, so that nothing is fetched for this)."""
    from pathlib import Path

    if not data.train:
        return False
    for i, src in enumerate(data.train):
        if src.format == "auto" and not Path(src.path).exists():
            return False
        fmt = src.format if src.format != "auto" else _first_row_format(src, f"data.train[{i}]")
        if fmt != "text":
            return False
    return True


def invented_template(tokenizer, data: DataConfig) -> bool:
    """True when training would give this tokenizer a chat template it does not have (a base model, data.template
    left at `tokenizer`)."""
    return not tokenizer.chat_template and data.template == "tokenizer"


def without_template(tokenizer):
    """A copy of the tokenizer without its chat template (the one to save for a text run on a base model)."""
    import copy

    saved = copy.deepcopy(tokenizer)
    saved.chat_template = None
    return saved
