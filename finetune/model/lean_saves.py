"""Lean saves (`training.lean_saves`): tensors that cheap elementwise work recreates are not kept for backward.

Without gradient checkpointing a training forward keeps, per token and decoder layer, every linear layer's input for
its LoRA branch and every elementwise op's inputs. Several of those are the outputs of cheap elementwise work on
tensors kept anyway: each RMSNorm's output (recreated from its input, which the norm itself keeps), the MLP's
activation `act(gate)` and the product `act(gate) * up` that feeds `down_proj` (recreated from `gate` and `up`,
which the activation and the product keep), and the per-sample attention's output that feeds `o_proj` (recreated
from the attention kernel's outputs, which it keeps; `finetune.model.attention`, padding-free rows off CUDA). A pair
of saved-tensor hooks around the causal LM's training forwards drops them: when autograd saves one of those tensors
(or a view of it), the hook keeps instead how to recreate it, and backward recreates it when it needs it. The values
are the same bits (the same elementwise ops on the same inputs), so loss and gradients do not change; backward does
the elementwise work again (a few percent of a step).

Per token and layer of a Llama-style model (hidden h, MLP intermediate i) the forward then keeps about 2h + 2i fewer
values, `4 x intermediate + 4 x hidden` -> `2 x intermediate + 2 x hidden` of the layer's largest parts: on
SmolLM2-135M about 40% of the activations by the shapes. The gated MLPs of the Llama, Qwen, Mistral and Gemma
families (modules with `gate_proj`, `up_proj`, `down_proj` and `act_fn`, running their class's own forward) get a
forward that registers what they make; a fused kernel's MLP, a Mixture-of-Experts block or another shape keeps its
forward, and its norms are still handled. A tensor changed in place after it was registered, or one whose layout the
recreation cannot restore, is kept as usual. Not installed with `training.offload_activations` (offload moves every
saved tensor to the host; the recreations would hold their inputs on the GPU). Inside a gradient-checkpointed region
the checkpoint's own hooks take precedence (the region keeps only its inputs anyway). Counters: `lean_counts()`.
"""

from __future__ import annotations

import types
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from finetune.model.offload import around_training_forwards

_counts: Counter[str] = Counter()
MARK = "_finetune_lean_forward"  # attribute set on an MLP whose forward this module replaced
_active: list[Registry] = []  # the registries of the training forwards running, innermost last


def lean_counts(reset: bool = False) -> dict[str, int]:
    """Tensors recreated in backward instead of kept (`dropped`: storages, each once per forward, and their bytes
    `dropped_bytes`), since the last reset."""
    counts = dict(_counts)
    if reset:
        _counts.clear()
    return counts


class _Recreate:
    """How to make a saved tensor again: `fn(*args)` gives its base, viewed with the saved tensor's layout."""

    __slots__ = ("fn", "args", "size", "stride", "offset")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple, t: torch.Tensor):
        self.fn, self.args = fn, args
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class Registry:
    """The tensors of the running forward that may be recreated: storage address -> (base, version, fn, args)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, int, Callable[..., torch.Tensor], tuple]] = {}
        self.depth = 0  # forwards entered (a model called inside another's forward shares the registry)
        self.dropped: dict[int, weakref.ref] = {}  # storages of this forward not kept (each counted once)

    def add(self, base: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
        """`base` (contiguous) equals `fn(*args)` and may be recreated so while it is unchanged."""
        if self.depth and base.is_contiguous() and base.storage_offset() == 0:
            self.entries[base.untyped_storage().data_ptr()] = (weakref.ref(base), base._version, fn, args)

    def pack(self, t: torch.Tensor) -> Any:
        entry = self.entries.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        base = entry[0]() if entry is not None else None
        if base is None or base._version != entry[1] or t._version != entry[1] or t.dtype != base.dtype:
            # not ours, gone (its address reused) or changed in place: kept as autograd would
            return t
        _, _, fn, args = entry
        address = t.untyped_storage().data_ptr()
        if (seen := self.dropped.get(address)) is None or seen() is not base:  # an address is reused once freed
            self.dropped[address] = weakref.ref(base)
            _counts["dropped"] += 1
            _counts["dropped_bytes"] += t.untyped_storage().nbytes()
        return _Recreate(fn, args, t)

    def entered(self, step: int) -> None:
        """A training forward of the model entered (+1) or left (-1); the last one out forgets the forward."""
        self.depth += step
        if step > 0:
            _active.append(self)
        elif _active and _active[-1] is self:
            _active.pop()
        if not self.depth:
            self.entries.clear()  # what was saved holds its own references
            self.dropped.clear()

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Recreate):
            return packed
        with torch.no_grad():
            base = packed.fn(*packed.args)
        return base.as_strided(packed.size, packed.stride, packed.offset)


def register(base: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
    """Code below the causal LM (the attention): `base` equals `fn(*args)` and may be recreated so in backward, if a
    training forward with lean saves is running."""
    if _active:
        _active[-1].add(base, fn, *args)


def _act_of(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda gate: act(gate).contiguous()


def _lean_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP's forward, `down(act(gate(x)) * up(x))`, registering the activation and the product."""
    registry: Registry = self._finetune_lean_registry
    gate, up = self.gate_proj(x), self.up_proj(x)
    act = self.act_fn(gate)
    registry.add(act, _act_of(self.act_fn), gate)
    product = act * up
    registry.add(product, lambda g, u, f=self.act_fn: f(g) * u, gate, up)
    return self.down_proj(product)


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and not hasattr(module, "experts") and "forward" not in vars(module))


def _norm_hook(registry: Registry) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            registry.add(output, lambda h, m=module: m(h).contiguous(), args[0])

    return hook


def install(lm: torch.nn.Module) -> str | None:
    """Drop recreatable saves in the training forwards of `lm` (the causal LM instance); returns the record line
    (None when the model has no RMSNorm and no gated MLP to work on)."""
    registry = Registry()
    norms = [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in lm.modules() if _is_gated_mlp(m)]
    if not norms and not mlps:
        return None
    for norm in norms:
        norm.register_forward_hook(_norm_hook(registry))
    for mlp in mlps:
        mlp._finetune_lean_registry = registry
        mlp.forward = types.MethodType(_lean_mlp_forward, mlp)
        setattr(mlp, MARK, True)
    around_training_forwards(lm, registry.pack, registry.unpack, registry.entered)
    return (f"{len(norms)} RMSNorm outputs and {len(mlps)} MLP activations and products recreated in backward "
            "instead of kept (finetune.model.lean_saves)")
