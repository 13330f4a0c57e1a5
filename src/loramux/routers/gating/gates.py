"""MoLE gates (ALGORITHMS.md §2, arXiv 2404.13628): learned weights over frozen LoRAs.

One gate per gated unit: each adapted module ("layer"), each transformer block ("block"), or one
for the whole model ("network"). A gate mean-pools its input over the sequence's real tokens
(mask-aware, so padded batches of any lengths work, where the paper flattens a fixed length),
normalises it (LayerNorm), projects it to K logits and takes softmax(logits / τ) with a
learnable temperature τ. A block's or the network's gate reads the input of its first adapted
module (the block's normalised hidden state) and its weights serve every module of the unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import LoramuxError

GRANULARITIES = ("layer", "block", "network")
_BLOCK = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def gated_modules(fused) -> dict[str, int]:
    """Fused module -> input width, in forward order, for the modules some loaded adapter adapts
    (the others never call a gate: the fused layer is the plain base layer there)."""
    return {m: layer.base.in_features for m, layer in fused.layers.items() if layer.max_rank > 0}


def unit_of(module: str, granularity: str) -> str:
    """The gated unit a fused module belongs to."""
    if granularity == "layer":
        return module
    if granularity == "network":
        return "network"
    m = _BLOCK.search(f".{module}")
    if not m:
        raise LoramuxError(f"cannot tell the transformer block of module {module!r}; use granularity 'layer'")
    return f"block.{m.group(1)}"


@dataclass(frozen=True)
class MoleConfig:
    granularity: str = "layer"
    init_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise LoramuxError(f"granularity must be one of {list(GRANULARITIES)}; got {self.granularity!r}")
        if not self.init_temperature > 0:
            raise LoramuxError(f"init_temperature must be > 0; got {self.init_temperature!r}")


class MoleGates(nn.Module):
    """The trainable part of MoLE: per unit a LayerNorm + Linear(d -> K) and a log-temperature."""

    def __init__(self, modules: dict[str, int], n_adapters: int, config: MoleConfig = MoleConfig()):
        """`modules`: fused module name -> its input width, in forward order."""
        super().__init__()
        self.config = config
        self.unit = {m: unit_of(m, config.granularity) for m in modules}
        self.anchor: dict[str, str] = {}  # unit -> the first of its modules in forward order
        for m in modules:
            self.anchor.setdefault(self.unit[m], m)
        self.units = list(self.anchor)
        self.index = {u: i for i, u in enumerate(self.units)}
        self.norms = nn.ModuleList(nn.LayerNorm(modules[self.anchor[u]]) for u in self.units)
        self.projs = nn.ModuleList(nn.Linear(modules[self.anchor[u]], n_adapters) for u in self.units)
        for p in self.projs:  # start from the uniform mixture
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.log_tau = nn.Parameter(torch.full((len(self.units),), float(torch.log(torch.tensor(config.init_temperature)))))
        self.n_adapters = n_adapters

    def logits(self, unit: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, K) logits / τ from the unit's input x (B, T, d) and attention mask (B, T) or None."""
        i = self.index[unit]
        if mask is not None and mask.shape[:2] == x.shape[:2]:
            m = mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        else:
            pooled = x.mean(1)
        h = self.norms[i](pooled.to(self.projs[i].weight.dtype))
        return self.projs[i](h) / self.log_tau[i].exp()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
