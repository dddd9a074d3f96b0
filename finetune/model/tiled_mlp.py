"""Tiled MLP: each decoder layer's MLP runs over tiles of the sequence in training, one tile's intermediates alive.

At long context the MLP's intermediate activations are the largest part of a layer's training memory: per token the
gate and up projections' outputs, the activation and their product (3 x intermediate size values; SmolLM2-135M:
intermediate 1536 = 2.7 x hidden), plus each LoRA branch's input. A layer keeps them for backward (without gradient
checkpointing, in every layer at once; with it, in the one layer being recomputed). The MLP works token by token,
so it can run over slices of the sequence: each slice goes through `torch.utils.checkpoint` (non-reentrant, random
state preserved, so LoRA dropout draws the same masks when recomputed), which keeps only the slice's input, and in
backward recomputes one slice's forward at a time. Cost: one more MLP forward per step (about a third of the MLP's
work); results: the same loss and gradients up to float rounding (`tests/unit/test_tiled_mlp.py`).

Applied per model instance by `finetune.model.patches.apply_patches` (the `tiled mlp` patch), on dense MLP modules
only: a Mixture-of-Experts block records its router's outputs per call, which tiling would split, so it is left as it
is and the patch says so. `tiled_calls` counts the tiled forwards that ran (the stage summary keeps the count).
"""

from __future__ import annotations

import math
import types
from collections import Counter
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

ORIG = "_finetune_untiled_forward"  # attribute of a patched MLP module: its forward before tiling
PLAN = "_finetune_mlp_tiles"  # attribute of a patched MLP module: (fixed tile count or None, auto tile length)
AUTO_FROM = 4096  # `auto`: rows longer than this many tokens run tiled ...
AUTO_TILE = 2048  # ... in tiles of about this many tokens
_calls: Counter[str] = Counter()


def tiled_calls(reset: bool = False) -> dict[str, int]:
    """Tiled MLP forwards since the last reset (`tiled`: calls, `tiles`: tiles run); `reset` clears the counts."""
    counts = dict(_calls)
    if reset:
        _calls.clear()
    return counts


def tile_count(setting: str | int, tokens: int) -> int:
    """How many tiles a row of `tokens` tokens runs in (1: not tiled) for the recipe's `training.tiled_mlp`."""
    if setting == "off" or tokens <= 1:
        return 1
    if setting == "auto":
        return math.ceil(tokens / AUTO_TILE) if tokens > AUTO_FROM else 1
    return max(1, min(int(setting), tokens))


def _tiled_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    original = getattr(self, ORIG)
    n = tile_count(getattr(self, PLAN), x.shape[-2]) if x.dim() >= 2 else 1
    if n <= 1 or args or kwargs or not torch.is_grad_enabled():
        return original(x, *args, **kwargs)
    _calls["tiled"] += 1
    _calls["tiles"] += n
    size = math.ceil(x.shape[-2] / n)
    parts = [checkpoint(original, tile, use_reentrant=False) for tile in x.split(size, dim=-2)]
    return torch.cat(parts, dim=-2)


def _is_moe(module: torch.nn.Module) -> bool:
    """A Mixture-of-Experts block (a router, or experts), whatever the family calls its parts."""
    return any(hasattr(module, name) for name in ("experts", "gate", "router")) and not hasattr(module, "gate_proj")


def decoder_mlps(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The MLP module of every decoder layer: `<...>.layers.N.mlp` (Llama, Qwen, Mistral, Gemma...) or
    `<...>.h.N.mlp` (GPT-2's Conv1D family)."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1] == "mlp" and parts[-2].isdigit() and parts[-3] in ("layers", "h"):
            found.append((name, module))
    return found


def install(model: Any, setting: str | int) -> str | None:
    """Tile the MLPs of this model instance for `training.tiled_mlp`; returns what was done for the patch record
    (None when the setting is `off` or the model has no decoder MLPs)."""
    if setting == "off":
        return None
    mlps = decoder_mlps(model)
    if not mlps:
        return None
    dense = [(n, m) for n, m in mlps if not _is_moe(m)]
    if not dense:
        return f"not applied: {len(mlps)} Mixture-of-Experts blocks (their router outputs are recorded per call)"
    for _, module in dense:
        if not hasattr(module, ORIG):
            setattr(module, ORIG, module.forward)
            module.forward = types.MethodType(_tiled_forward, module)
        setattr(module, PLAN, setting)
    when = (f"rows over {AUTO_FROM} tokens, in tiles of about {AUTO_TILE} (auto)" if setting == "auto"
            else f"in {setting} tiles")
    skipped = f"; {len(mlps) - len(dense)} MoE blocks left whole" if len(dense) < len(mlps) else ""
    return f"{len(dense)} layer MLPs run over sequence tiles in training, {when}{skipped} (finetune.model.tiled_mlp)"


def is_tiled(module: torch.nn.Module) -> bool:
    """Whether this module's forward is the tiled one."""
    return getattr(module.forward, "__func__", None) is _tiled_forward
