"""The three shapes of routing weights the fused layer accepts (ALGORITHMS.md, "exact fused output").

Routers only *produce* these values; `MultiLoraLinear` applies them. Weights may be negative
(task arithmetic subtracts adapters) but must be finite, and a mixture must name at least one
adapter: "no adapter" is expressed by running without a mixture (the base model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from ..errors import LoramuxError

if TYPE_CHECKING:
    import torch


def _check(indices: "torch.Tensor", weights: "torch.Tensor", what: str, lead: int) -> None:
    import torch

    if indices.shape != weights.shape or indices.dim() != lead + 1:
        raise LoramuxError(f"{what}: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the "
                           f"same shape with {lead + 1} dims")
    if indices.shape[-1] == 0:
        raise LoramuxError(f"{what}: empty mixture; name at least one adapter (run without a mixture for the base model)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise LoramuxError(f"{what}: indices must be integer slot numbers; got dtype {indices.dtype}")
    if not torch.isfinite(weights).all():
        raise LoramuxError(f"{what}: weights must be finite; got {weights.flatten().tolist()[:8]}")


@dataclass(frozen=True)
class SequenceMixture:
    """One sparse mixture per batch row, the same in every layer and at every token (DLP-LoRA,
    fixed mixtures). indices/weights: (B, m) slot numbers and their weights."""

    indices: "torch.Tensor"
    weights: "torch.Tensor"

    def __post_init__(self) -> None:
        _check(self.indices, self.weights, "sequence mixture", 1)

    @functools.cached_property
    def union(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(slots, inverse): the sorted distinct slots any row selects (U,) and, for each entry of
        `indices`, its position among them (B, m). Computed once, shared by every fused layer."""
        import torch

        slots, inverse = torch.unique(self.indices.long(), sorted=True, return_inverse=True)
        return slots, inverse

    @functools.cached_property
    def rows_alike(self) -> bool:
        """Every row selects the same slots with the same weights. Decided once per mixture, where
        its tensors were made (the host, for `FusedModel.sequence_mixture`), not once per layer on
        the device: that would wait on the device in every fused layer."""
        return self.indices.shape[0] == 1 or bool((self.indices == self.indices[:1]).all()
                                                   and (self.weights == self.weights[:1]).all())


@dataclass(frozen=True)
class TokenMixture:
    """One sparse mixture per token (Arrow). indices/weights: (B, T, m)."""

    indices: "torch.Tensor"
    weights: "torch.Tensor"

    def __post_init__(self) -> None:
        _check(self.indices, self.weights, "token mixture", 2)


# A gate living at each adapted layer: called with the layer's name, its input x (B, T, d_in) and
# the attention mask (B, T) or None; returns dense weights over all K slots, either per sequence
# (B, K) (MoLE) or per token (B, T, K) (Arrow, computed from the layer's own input).
LayerGate = Callable[[str, "torch.Tensor", "torch.Tensor | None"], "torch.Tensor"]


@dataclass(frozen=True)
class LayerMixture:
    """Weights computed at each adapted layer by a gate, per sequence (MoLE) or per token (Arrow).
    `slots`: the only slots the gate ever weighs (None: any); the fused layers' fast path leaves the
    others out, so an adapter loaded beside the gated ones (the library's general adapter, which
    serves abstained prompts) costs nothing in their forward. The gate still returns all K columns,
    zero outside `slots`; the reference loop reads them all."""

    gate: LayerGate
    slots: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.slots is not None:
            slots = tuple(self.slots)
            if not all(isinstance(k, int) and k >= 0 for k in slots) or len(set(slots)) != len(slots):
                raise LoramuxError(f"layer mixture: slots must be distinct slot numbers >= 0; got {slots}")
            object.__setattr__(self, "slots", tuple(sorted(slots)))


Mixture = Union[SequenceMixture, TokenMixture, LayerMixture]
