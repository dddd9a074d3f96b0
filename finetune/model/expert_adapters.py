"""LoRA on fused Mixture-of-Experts experts inside finetune's own experts forward (issue 30).

peft adapts the fused 3D experts ([experts, out, in]) as raw parameters by adding its update to the weight itself,
which a 4-bit weight (`NF4Experts`) cannot take. Here the update rides beside the weight, one `ExpertLoRA` per fused
weight of a layer, and `moe_experts.experts_forward` adds it inside each expert's computation, before the activation
(the experts are nonlinear): gate_up = W_e x + s B_e A_e x, then down = W_e h + s B_e A_e h, with W_e the stored
weight (NF4 through bitsandbytes' matmul, or plain). Three layouts of A and B:

- `shared` (`lora.experts: shared`): A [r, in], B [out, r] per fused weight and layer, the same delta for every expert;
- `per_expert` (with `quantization.experts`): A [experts, r, in], B [experts, out, r];
- per-expert ranks (`lora.expert_rank: by_routing`): ragged, one A [r_e, in] and B [out, r_e] per expert (a
  ParameterList), so the trainable parameters counted are exactly the ones held and trained.

They are ours, not peft's: saved beside peft's adapter as `expert_adapter.safetensors` (keys: the plain model's weight
name + `.A` / `.B`; the layout and scale in the file's header) and loaded by `load` wherever finetune loads an adapter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.model.moe_experts import ADAPTERS, select_own_forward

EXPERT_FILE = "expert_adapter.safetensors"
ATTR = ADAPTERS  # the ModuleDict on each experts module: {fused weight name: ExpertLoRA}


class ExpertLoRA(nn.Module):
    """The low-rank update of one fused expert weight [experts, out, in].

    Args:
        experts: Experts in the layer.
        out_features: Rows of each expert's weight.
        in_features: Columns of each expert's weight.
        ranks: One rank per expert (`per_expert`), or a single int for one update shared by every expert.
        scale: alpha / r (the LoRA scaling).
        init_b: B random instead of zero (tests: an update that is not zero from the start).
    """

    def __init__(self, experts: int, out_features: int, in_features: int, ranks: int | list[int], scale: float,
                 init_b: bool = False):
        super().__init__()
        self.experts, self.scale = experts, float(scale)
        self.shared = isinstance(ranks, int)
        self.ranks = [ranks] * experts if self.shared else list(ranks)
        if self.shared:
            self.A = nn.Parameter(torch.empty(ranks, in_features))
            self.B = nn.Parameter(torch.empty(out_features, ranks))
            pairs = [(self.A, self.B)]
        elif len(set(self.ranks)) == 1:
            self.A = nn.Parameter(torch.empty(experts, self.ranks[0], in_features))
            self.B = nn.Parameter(torch.empty(experts, out_features, self.ranks[0]))
            pairs = list(zip(self.A, self.B, strict=True))
        else:  # ragged: each expert holds its own rank
            self.A = nn.ParameterList([nn.Parameter(torch.empty(r, in_features)) for r in self.ranks])
            self.B = nn.ParameterList([nn.Parameter(torch.empty(out_features, r)) for r in self.ranks])
            pairs = list(zip(self.A, self.B, strict=True))
        with torch.no_grad():
            for a, b in pairs:  # peft's default: A as a linear layer's weight, B zero (training starts at the base)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                if init_b:
                    nn.init.normal_(b, std=0.1)
                else:
                    b.zero_()

    enabled = True  # off inside `disabled(model)` (peft's `disable_adapter` on a model carrying them)

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of `expert`."""
        if self.shared:
            return self.A, self.B
        return self.A[expert], self.B[expert]

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """s * x A_e^T B_e^T: the update's share of `expert`'s output for its tokens `x` [tokens, in]."""
        a, b = self.factors(expert)  # float32 weights; the matmuls in x's dtype (autocast would cast them anyway)
        return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * self.scale

    def delta(self) -> torch.Tensor:
        """s * B_e A_e of every expert in float32: [experts, out, in] (what a merge adds to the weight)."""
        return torch.stack([(b.float() @ a.float()) * self.scale for a, b in
                            (self.factors(e) for e in range(self.experts))])

    def layout(self) -> dict[str, Any]:
        return {"shared": self.shared, "ranks": self.ranks, "scale": self.scale}


def uses_own_adapters(lora: Any, quantized_experts: bool) -> bool:
    """Whether `lora` puts its expert adapters here rather than in peft: `shared` always; `per_expert` on 4-bit
    experts or with ranks by routing (peft holds one rank for all)."""
    return lora.experts == "shared" or (lora.experts == "per_expert" and (
        quantized_experts or getattr(lora, "expert_rank", "uniform") == "by_routing"))


def experts_modules(model: Any, expert_parameters: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module holding the fused weights `expert_parameters` (`mlp.experts.X`)."""
    owners = {p.rpartition(".")[0] for p in expert_parameters}
    return [(n, m) for n, m in model.named_modules()
            if any(n.endswith("." + o) for o in owners) and hasattr(m, "gate_up_proj")]


def add(model: Any, expert_parameters: tuple[str, ...], r: int, alpha: float, shared: bool,
        ranks: list[list[int]] | None = None, use_rslora: bool = False, init_b: bool = False) -> int:
    """Put an `ExpertLoRA` beside every fused expert weight of `model` (trainable, float32) and select finetune's
    experts forward. `ranks`: per MoE layer, one rank per expert (`by_routing`); else `r` for all. Returns the count."""
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    done = 0
    for layer, (_, module) in enumerate(experts_modules(model, expert_parameters)):
        adapters = nn.ModuleDict()
        for path in expert_parameters:
            attr = path.rpartition(".")[2]
            weight = getattr(module, attr)
            experts, out_features, in_features = weight.shape
            wanted: int | list[int] = r if shared else (ranks[layer] if ranks is not None else [r] * experts)
            adapters[attr] = ExpertLoRA(experts, out_features, in_features, wanted, scale, init_b).to(
                device=_device(weight))
            done += 1
        setattr(module, ATTR, adapters)
    if done:
        select_own_forward(model)
    return done


def _device(weight: Any) -> torch.device:
    return weight.packed.device if hasattr(weight, "packed") else weight.device


def held(model: Any) -> dict[str, ExpertLoRA]:
    """{plain weight name (`model.layers.0.mlp.experts.gate_up_proj`): its ExpertLoRA} of a model, peft-wrapped or
    not."""
    out = {}
    for name, module in model.named_modules():
        adapters = getattr(module, ATTR, None)
        if isinstance(adapters, nn.ModuleDict):
            for attr, lora in adapters.items():
                out[f"{_plain(name)}.{attr}"] = lora
    return out


@contextmanager
def disabled(model: Any) -> Iterator[None]:
    """The model without its expert adapters for the duration (the base's forward, as peft's `disable_adapter`)."""
    adapters = list(held(model).values())
    for lora in adapters:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in adapters:
            lora.enabled = True


def _plain(name: str) -> str:
    """A module name inside a peft model (`base_model.model.model.layers.0...`) as the plain model names it."""
    return name.removeprefix("base_model.model.")


def save(model: Any, folder: str | Path) -> bool:
    """Write `EXPERT_FILE` into `folder` when the model holds expert adapters; returns whether it did."""
    from safetensors.torch import save_file

    adapters = held(model)
    if not adapters:
        return False
    tensors, layouts = {}, {}
    for key, lora in adapters.items():
        for name, param in lora.named_parameters():
            tensors[f"{key}.{name}"] = param.detach().float().cpu().contiguous()
        layouts[key] = lora.layout()
    save_file(tensors, str(Path(folder) / EXPERT_FILE), metadata={"finetune.expert_lora": json.dumps(layouts)})
    return True


def saved_layouts(folder: str | Path) -> dict[str, dict[str, Any]] | None:
    """The layouts in `folder`'s `EXPERT_FILE` (None when it has none)."""
    from safetensors import safe_open

    path = Path(folder) / EXPERT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["finetune.expert_lora"])


def load(model: Any, folder: str | Path, trainable: bool = False) -> int:
    """Rebuild the expert adapters saved in `folder` (layout from the file, not from a recipe) on `model` and load
    their weights; returns how many (0 when the folder has none)."""
    from safetensors.torch import load_file

    from finetune.errors import FinetuneError

    layouts = saved_layouts(folder)
    if layouts is None:
        return 0
    tensors = load_file(str(Path(folder) / EXPERT_FILE))
    modules = dict(model.named_modules())
    by_plain = {_plain(n): m for n, m in modules.items()}
    for key, layout in layouts.items():
        owner, _, attr = key.rpartition(".")
        module = by_plain.get(owner)
        if module is None or not hasattr(module, attr):
            raise FinetuneError(f"{Path(folder) / EXPERT_FILE}: the model has no experts weight {key}; this adapter "
                                "was trained on another model")
        adapters = getattr(module, ATTR, None)
        if not isinstance(adapters, nn.ModuleDict):
            adapters = nn.ModuleDict()
            setattr(module, ATTR, adapters)
        lora = adapters[attr] if attr in adapters else None
        if lora is None or lora.layout() != layout:  # else loaded in place: an optimizer holding them keeps them
            weight = getattr(module, attr)
            experts, out_features, in_features = weight.shape
            ranks = layout["ranks"][0] if layout["shared"] else layout["ranks"]
            lora = ExpertLoRA(experts, out_features, in_features, ranks, layout["scale"]).to(device=_device(weight))
            adapters[attr] = lora
        with torch.no_grad():
            for n, param in lora.named_parameters():
                param.copy_(tensors[f"{key}.{n}"])
        lora.requires_grad_(trainable)
    select_own_forward(model)
    return len(layouts)


def saved_ranks(folder: str | Path) -> list[list[int]] | None:
    """Per MoE layer, the per-expert ranks saved in `folder` (None without a file or with a shared update)."""
    layouts = saved_layouts(folder)
    if not layouts:
        return None
    first = next(iter(layouts)).rpartition(".")[2]  # one fused weight per layer gives the layer's ranks
    rows = [v for k, v in layouts.items() if k.endswith("." + first)]
    return None if any(v["shared"] for v in rows) else [v["ranks"] for v in rows]


def ranks_by_routing(shares: torch.Tensor, r: int) -> list[list[int]]:
    """Per MoE layer, one rank per expert proportional to its routing share, at least 1, summing to experts x r (the
    uniform budget), by largest remainders.

    Args:
        shares: [layers, experts] shares of routed slots (`finetune.eval.routing.expert_load`), rows summing to 1.
        r: The uniform rank whose total is kept.
    """
    out = []
    for row in shares.double():
        experts = row.numel()
        budget = experts * r
        spare = budget - experts  # every expert gets 1; the rest by share
        want = row / row.sum() * spare
        ranks = [1 + int(w) for w in want.floor().tolist()]
        left = budget - sum(ranks)
        for e in sorted(range(experts), key=lambda i: -(float(want[i]) - math.floor(float(want[i]))))[:left]:
            ranks[e] += 1
        out.append(ranks)
    return out
