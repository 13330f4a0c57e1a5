"""The value every router returns, and DLP-LoRA's top-p selection (ALGORITHMS.md §1).

A `Routing` is one prompt's decision: which adapters, with what weights, and the router's own
scores over every adapter, so a user can see why an adapter was chosen. It travels into the
engine (GenerationRequest.routing) and back out in the GenerationResult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from ..errors import LoramuxError

Weighting = Literal["renorm", "softmax"]
WEIGHTINGS = ("renorm", "softmax")


@dataclass(frozen=True)
class Routing:
    adapters: tuple[str, ...]  # chosen, most probable first; empty when abstained
    weights: tuple[float, ...]  # fusion weight of each chosen adapter
    probabilities: dict[str, float] = field(default_factory=dict)  # router score of every adapter
    abstained: bool = False  # True: no routed adapter fits; the general adapter or the base model serves it
    reason: str = ""  # why it abstained (or how it chose), in words
    router: str = ""  # which router decided
    granularity: str = "sequence"  # "sequence": one mixture for the prompt; "token": chosen per token and module
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # token routers: mean weights per module
    general: str = ""  # abstained: the library's general adapter serves the prompt ("" : the base model)

    @property
    def mixture(self) -> dict[str, float] | None:
        """The engine's mixture for this routing; when abstained, the general adapter alone or None
        (the base model); None too for a per-token routing (the router's own gate applies it)."""
        if self.abstained:
            return {self.general: 1.0} if self.general else None
        if not self.adapters or self.granularity != "sequence":
            return None
        return dict(zip(self.adapters, self.weights))

    @property
    def served_by(self) -> str:
        """Who serves an abstained prompt, in words."""
        return f"general adapter {self.general!r}" if self.general else "base model"

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_dict(self) -> dict:
        return {"router": self.router, "granularity": self.granularity, "adapters": list(self.adapters),
                "weights": list(self.weights), "probabilities": dict(self.probabilities), "abstained": self.abstained,
                "reason": self.reason, **({"layers": self.layers} if self.layers else {}),
                **({"general": self.general} if self.abstained and self.general else {})}


class Router(Protocol):
    """What the engine needs of a sentence-level router."""

    def route(self, prompts: list[str]) -> list[Routing]: ...


class TokenRouter(Protocol):
    """What the engine needs of a per-token router (Arrow): a gate for the fused layers, and a
    way to report what each row's prompt used."""

    kind: str
    granularity: str  # "token"

    def layer_mixture(self): ...

    def recording(self, attention_mask): ...

    def routings(self, recorder) -> list[Routing]: ...


def top_p_select(probs: Sequence[float], p: float, top_k: int | None = None) -> list[int]:
    """Indices of the smallest most-probable prefix whose cumulative probability reaches `p`.

    DLP-LoRA's selection: sort descending, keep adding until the sum is >= p, always keep the
    first. Ties keep the lower index first (a stable sort), so equal scores choose
    deterministically. `top_k` caps the prefix length. A relative tolerance of 1e-9 absorbs float
    rounding, so p = 1.0 stops at the last adapter with nonzero probability.
    """
    if not 0 < p <= 1:
        raise LoramuxError(f"top-p must be in (0, 1]; got {p!r}")
    if top_k is not None and top_k < 1:
        raise LoramuxError(f"top-k must be a positive integer or None; got {top_k!r}")
    if not len(probs):
        raise LoramuxError("cannot select from an empty distribution")
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep: list[int] = []
    total = 0.0
    for i in order:
        keep.append(i)
        total += probs[i]
        if total >= p * (1 - 1e-9) or (top_k is not None and len(keep) >= top_k):
            break
    return keep


def fusion_weights(kept: Sequence[float], weighting: Weighting = "renorm") -> list[float]:
    """Weights for the kept probabilities: renormalised to sum 1 (default), or a softmax over
    them (DLP-LoRA's public code; it flattens the mixture towards uniform)."""
    if weighting == "renorm":
        total = sum(kept)
        if total <= 0:
            return [1.0 / len(kept)] * len(kept)
        return [q / total for q in kept]
    if weighting == "softmax":
        top = max(kept)
        exps = [math.exp(q - top) for q in kept]
        return [e / sum(exps) for e in exps]
    raise LoramuxError(f"weighting must be one of {list(WEIGHTINGS)}; got {weighting!r}")
