"""Activation offload (`training.offload_activations`): what the forward keeps for backward waits in host memory.

Every tensor autograd saves during a training forward of the model goes through a pair of saved-tensor hooks: on a
CUDA device it is copied into pinned host memory as it is saved (`non_blocking`: the copy is queued on the current
stream behind the kernel that produced it, and the caching allocator, stream-ordered, reuses the GPU block only after
it) and copied back when backward needs it. With gradient checkpointing (non-reentrant, as we enable it) the tensors
a layer saves are its checkpoint's inputs (the region's own saved tensors are handled by the checkpoint's inner
hooks, which take precedence): the checkpointed layer inputs, hidden size x tokens x layers, leave the GPU, which
at long context is most of what remains. Cost: the copies over PCIe, in both directions, serialized with compute.

Installed per model instance with forward pre- and post-hooks on the causal LM (entered only when gradients are
being recorded; the post-hook also runs when the forward raises), recorded by `finetune.model.patches`. Tensors on
other devices (the CPU) pass through untouched, unless a test asks for them to be copied (`devices`).
`offloaded_bytes` counts what was moved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

_counts: Counter[str] = Counter()


def offloaded_bytes(reset: bool = False) -> dict[str, int]:
    """Tensors (`tensors`) and bytes (`bytes`) moved to host memory since the last reset."""
    counts = dict(_counts)
    if reset:
        _counts.clear()
    return counts


def _hooks(devices: tuple[str, ...]):
    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device.type not in devices or tensor.is_sparse or tensor.numel() == 0:
            return tensor
        pinned = tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        _counts["tensors"] += 1
        _counts["bytes"] += tensor.numel() * tensor.element_size()
        return tensor.device, host

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=device.type == "cuda")

    return pack, unpack


def around_training_forwards(lm: torch.nn.Module, pack: Callable, unpack: Callable,
                             entered: Callable[[int], None] | None = None) -> None:
    """Have the saved-tensor hooks `pack`/`unpack` act in every training forward of `lm` (entered only when gradients
    are being recorded; left when the forward returns or raises). `entered(+1 / -1)` is called on entering and
    leaving."""
    active: list[Any] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            context = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
            context.__enter__()
            active.append(context)
            if entered is not None:
                entered(1)
        else:
            active.append(None)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        context = active.pop() if active else None
        if context is not None:
            context.__exit__(None, None, None)
            if entered is not None:
                entered(-1)

    lm.register_forward_pre_hook(enter)
    lm.register_forward_hook(leave, always_call=True)


def install(lm: torch.nn.Module, devices: tuple[str, ...] = ("cuda",)) -> str:
    """Offload what the training forwards of `lm` (the causal LM instance) save for backward; returns the record
    line."""
    around_training_forwards(lm, *_hooks(devices))
    where = "pinned host memory" if devices == ("cuda",) else f"host memory (from {', '.join(devices)})"
    return f"tensors saved for backward in training move to {where} and back in backward (finetune.model.offload)"
