"""Which steps after training a model family cannot take, known from its config.json before anything trains.

`ft validate` prints these, each naming the step, the reason and what to do instead, and `ft export` refuses the
same way: a family is never found out after training.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def refusals(kind: str | None, quantized: bool = False) -> list[Refusal]:
    """The steps refused for the family `kind` (a transformers model_type); `quantized`: a QLoRA recipe."""
    from finetune.export.gguf_arch import ARCHS

    out = []
    if kind not in ARCHS:
        out.append(Refusal("ft export --format gguf", f"this toolkit does not write the '{kind}' architecture for "
                           f"llama.cpp (it writes {', '.join(sorted(ARCHS))})", "ft export --format merged, then "
                           "llama.cpp's convert_hf_to_gguf.py on that folder if llama.cpp supports the model"))
    if traits(kind).fused_experts and quantized:
        out.append(Refusal("ft export --format merged --merge-into dequantized (the QLoRA default)", "LoRA adapts "
                           "the experts as raw 3D parameters, which only peft's merge into the original weights knows",
                           "ft export --format merged --merge-into original, or --format adapter"))
    return out


def family_lines(recipe: Recipe) -> list[str]:
    """`ft validate`'s lines about the base model's family: its model_type and every step refused for it."""
    kind = model_type(recipe.model)
    if kind is None:
        return ["# model family: unknown until the model loads (no config.json at hand)"]
    quantized = recipe.quantization.mode != "none"
    return [f"# model family: {kind}"] + [f"#   {r.line()}" for r in refusals(kind, quantized)]
