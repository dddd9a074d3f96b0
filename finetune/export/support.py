"""Which steps after training a model family cannot take, known from its config.json and tokenizer files (nothing
is loaded) before anything trains.

`ft validate` prints these, each naming the step, the reason and what to do instead, and `ft export` refuses the
same way: a family is never found out after training.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.model.families import model_type, traits
from finetune.recipe.schema import Recipe


@dataclass(frozen=True)
class Refusal:
    """A step this family cannot take here: why, and what to do instead."""

    step: str
    reason: str
    instead: str

    def line(self) -> str:
        return f"{self.step}: refused, {self.reason}; instead: {self.instead}"


def refusals(kind: str | None, config: Any = None) -> list[Refusal]:
    """The steps refused for the family `kind` (a transformers model_type), and for this model of it where its
    `config` (a transformers config, when at hand) is one llama.cpp would run differently."""
    from finetune.export.gguf_arch import ARCHS, experts_problem

    out = []
    if kind not in ARCHS:
        out.append(Refusal("ft export --format gguf", f"this toolkit does not write the '{kind}' architecture for "
                           f"llama.cpp (it writes {', '.join(sorted(ARCHS))})", GGUF_INSTEAD))
    elif config is not None and (problem := experts_problem(config)):
        out.append(Refusal("ft export --format gguf", f"llama.cpp would not run this {kind} model as transformers "
                           f"does: {problem}", "ft export --format merged, and run that folder with transformers"))
    return out


def base_config(recipe: Recipe) -> Any:
    """The base model's transformers config from its config.json alone, local or in the Hub cache (None when there
    is none, or it does not parse: the model checks report that)."""
    path = Path(recipe.model.name_or_path) / "config.json"
    try:
        if not path.exists():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(recipe.model.name_or_path, "config.json", revision=recipe.model.revision)
            path = Path(cached) if isinstance(cached, str) else path
        values = json.loads(path.read_text(encoding="utf-8"))
        from transformers import AutoConfig

        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (OSError, ValueError, KeyError, TypeError):  # no config, or one transformers cannot build
        return None


GGUF_INSTEAD = "ft export --format merged, then llama.cpp's convert_hf_to_gguf.py on that folder"


def tokenizer_refusals(recipe: Recipe) -> list[Refusal]:
    """GGUF refusals read off the base's tokenizer files: a tokenizer GGUF cannot carry, or no chat template for a
    run that trains on text only (its tokenizer keeps having none)."""
    from finetune.data.textonly import trains_on_text_only
    from finetune.export.gguf_vocab import tokenizer_model
    from finetune.model.loading import load_tokenizer

    folder = Path(recipe.model.name_or_path)
    if not (folder / "tokenizer.json").exists():
        return []
    # as transformers loads it (and the run saves it): transformers 5 rebuilds some families' tokenizers on loading;
    # its pad-token note belongs to training, not to this check
    with contextlib.redirect_stdout(io.StringIO()):
        backend = getattr(load_tokenizer(recipe.model), "backend_tokenizer", None)
    try:
        if backend is not None:
            tokenizer_model(json.loads(backend.to_str()), "the base tokenizer as transformers loads it")
    except FinetuneError as e:
        return [Refusal("ft export --format gguf", str(e).split(". GGUF export writes")[0], GGUF_INSTEAD)]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer_config.json").exists() else {}
    has_template = bool(config.get("chat_template")) or (folder / "chat_template.jinja").exists()
    first = recipe.stage_data(recipe.effective_stages()[0])
    try:
        text_only = trains_on_text_only(first)
    except FinetuneError:  # unreadable data is reported by the data checks
        return []
    if text_only and not has_template and first.template == "tokenizer":
        return [Refusal("ft export --format gguf", "a text run on a base model without a chat template keeps having "
                        "none, and the GGUF check runs conversations", "set data.template (e.g. plain) to ship one, "
                        "or --format merged")]
    return []


def family_lines(recipe: Recipe) -> list[str]:
    """`ft validate`'s lines about the base model's family: its model_type and every step refused for it."""
    kind = model_type(recipe.model)
    if kind is None:
        return ["# model family: unknown until the model loads (no config.json at hand)"]
    found = refusals(kind, base_config(recipe))
    if not any(r.step == "ft export --format gguf" for r in found):
        found += tokenizer_refusals(recipe)
    notes = []
    if traits(kind).fused_experts and recipe.quantization.mode != "none" and not recipe.quantization.experts:
        notes.append("#   note: bitsandbytes quantizes linear layers only, so the experts (most of this model's "
                     "weight) stay in the model dtype; quantization.experts: true puts them in NF4 too")
    return [f"# model family: {kind}"] + [f"#   {r.line()}" for r in found] + notes
