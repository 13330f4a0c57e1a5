"""MoLE gates (ALGORITHMS.md §2, arXiv 2404.13628): learned weights over frozen LoRAs.

One gate per gated unit: each adapted module ("layer"), each transformer block ("block"), or one
for the whole model ("network"). Weights are softmax(logits / τ) with a learnable temperature τ.

What a gate reads (`gate_input`):

- "outputs", the paper's gating: the outputs E_i(x) = s_i·B_i·A_i·x of every LoRA at the unit's
  first adapted module, each normalised (LayerNorm), concatenated and projected to K logits. The
  paper flattens E_i over a fixed sequence length; an LLM's prompts vary in length, so the gate
  reads the mean over the real tokens instead. A LoRA is linear, so the mean of E_i(x_t) over
  tokens is E_i of the mean x: one rank-r product per adapter on the pooled input, exactly.
- "input" (loramux's earlier gate, kept for stored routers): the mean-pooled input x itself,
  normalised and projected.

Pooling is mask-aware, so padded batches of any lengths give each row the weights it gets alone.
A block's or the network's gate reads its first adapted module (the block's normalised hidden
state) and its weights serve every module of the unit. A Dynamic LoRA slot's input gate is not
applied inside E_i here (it is per token, so it does not commute with the mean).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import LoramuxError

GRANULARITIES = ("layer", "block", "network")
GATE_INPUTS = ("outputs", "input")
_BLOCK = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def _adapted(fused, adapters: list[str] | None) -> dict:
    """Fused module -> its layer, in forward order, for the modules some loaded adapter (of
    `adapters`, when given: the gated ones) adapts."""
    if adapters is None:
        return {m: layer for m, layer in fused.layers.items() if layer.max_rank > 0}
    slots = [list(fused.adapters).index(a) for a in adapters]
    return {m: layer for m, layer in fused.layers.items()
            if layer.num_slots > 0 and bool((layer.scaling[slots] != 0).any())}


def gated_modules(fused, adapters: list[str] | None = None) -> dict[str, int]:
    """Fused module -> input width, in forward order, for the modules some loaded adapter (of
    `adapters`, when given: the gated ones) adapts; the others need no gate."""
    return {m: layer.base.in_features for m, layer in _adapted(fused, adapters).items()}


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


def out_widths(fused, adapters: list[str] | None = None) -> dict[str, int]:
    """Fused module -> output width, for the same modules as `gated_modules`."""
    return {m: layer.base.out_features for m, layer in _adapted(fused, adapters).items()}


def pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d): the mean over each row's real tokens (all tokens without a mask)."""
    if mask is not None and mask.shape[:2] == x.shape[:2]:
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    return x.mean(1)


@dataclass(frozen=True)
class MoleConfig:
    granularity: str = "layer"
    init_temperature: float = 1.0
    gate_input: str = "outputs"  # the paper's gating; "input": the pooled hidden state (older routers)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise LoramuxError(f"granularity must be one of {list(GRANULARITIES)}; got {self.granularity!r}")
        if self.gate_input not in GATE_INPUTS:
            raise LoramuxError(f"gate_input must be one of {list(GATE_INPUTS)}; got {self.gate_input!r}")
        if not self.init_temperature > 0:
            raise LoramuxError(f"init_temperature must be > 0; got {self.init_temperature!r}")


class MoleGates(nn.Module):
    """The trainable part of MoLE: per unit a LayerNorm + Linear(-> K) and a log-temperature."""

    def __init__(self, modules: dict[str, int], n_adapters: int, config: MoleConfig = MoleConfig(),
                 outputs: dict[str, int] | None = None):
        """`modules`: fused module name -> its input width, in forward order; `outputs`: -> its
        output width (needed when the gates read the adapters' outputs)."""
        super().__init__()
        self.config = config
        self.unit = {m: unit_of(m, config.granularity) for m in modules}
        self.anchor: dict[str, str] = {}  # unit -> the first of its modules in forward order
        for m in modules:
            self.anchor.setdefault(self.unit[m], m)
        self.units = list(self.anchor)
        self.index = {u: i for i, u in enumerate(self.units)}
        if config.gate_input == "outputs":
            if outputs is None:
                raise LoramuxError("gates that read the adapters' outputs need the modules' output widths")
            widths = [outputs[self.anchor[u]] for u in self.units]
            self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
            self.projs = nn.ModuleList(nn.Linear(n_adapters * w, n_adapters) for w in widths)
        else:
            widths = [modules[self.anchor[u]] for u in self.units]
            self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
            self.projs = nn.ModuleList(nn.Linear(w, n_adapters) for w in widths)
        for p in self.projs:  # start from the uniform mixture
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.log_tau = nn.Parameter(torch.full((len(self.units),), float(torch.log(torch.tensor(config.init_temperature)))))
        self.n_adapters = n_adapters

    def logits(self, unit: str, x: torch.Tensor, mask: torch.Tensor | None, layer=None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) logits / τ from the unit's input x (B, T, d), its attention mask (B, T) or None,
        and (reading outputs) the fused layer of the unit's first module, whose slots are the K
        (or, given `slots`, whose slots at those indices are)."""
        return self.head(unit, self.features(unit, pool(x, mask), layer, slots))

    def features(self, unit: str, pooled: torch.Tensor, layer=None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """What the unit's gate normalises, from its pooled input (B, d): the K adapters' outputs
        on it (B, K, d_out) when the gate reads outputs, else the pooled input itself. It holds no
        trainable parameter, so a fit on fixed inputs computes it once (route_init.py)."""
        dtype = self.projs[self.index[unit]].weight.dtype
        if self.config.gate_input != "outputs":
            return pooled.to(dtype)
        A, B, scaling = layer.lora_A, layer.lora_B, layer.scaling
        if slots is not None:
            A, B, scaling = A[slots], B[slots], scaling[slots]
        A, B = A.to(dtype), B.to(dtype)  # (K, r, d_in), (K, d_out, r)
        z = torch.einsum("bd,krd->bkr", pooled.to(dtype), A) * scaling.to(dtype)[None, :, None]
        return torch.einsum("bkr,kor->bko", z, B)

    def head(self, unit: str, features: torch.Tensor) -> torch.Tensor:
        """(B, K) logits / τ from `features`: normalised (each adapter's output on its own),
        flattened, projected."""
        i = self.index[unit]
        return self.projs[i](self.norms[i](features).flatten(1)) / self.log_tau[i].exp()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
