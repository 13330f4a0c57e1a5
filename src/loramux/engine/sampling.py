"""Next-token choice: greedy, or temperature + top-p with a per-request generator."""

from __future__ import annotations

import torch

from ..errors import LoramuxError


class NonFiniteOutput(LoramuxError):
    """The model's output for a request is not finite: its mixture (e.g. extreme adapter weights)
    overflowed. The request's fault, so a 400, not a server error."""

    def __init__(self) -> None:
        super().__init__("the model's output is not finite for this request (are its adapter weights extreme?)")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose probability reaches top_p.

    probs: (V,). The most likely token is always kept; the result is renormalised.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
    keep = before < top_p
    keep[0] = True
    filtered = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return filtered / filtered.sum()


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from one row of logits (V,)."""
    if temperature == 0:
        return int(logits.argmax())
    # Shift before scaling: (l - max) / T stays finite-or--inf for any T > 0 (a tiny T such as
    # 1e-39 would turn l / T into inf - inf = nan), so the most likely token always keeps mass.
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # only non-finite logits get here (e.g. extreme adapter weights)
        raise NonFiniteOutput()
    return int(torch.multinomial(top_p_filter(probs, top_p), 1, generator=generator))
