"""Next-token choice for every row of a decode step: greedy, or temperature + top-p with a
per-request generator, plus the log-probabilities a row asked for.

Everything is computed on the logits' device and comes to the host in **one** transfer per step
(`pick`): a per-row `int(...)` would wait on the device once per row, which on a GPU serialises
the step. A row whose output is not finite is not sampled from (on CUDA a NaN probability in
`torch.multinomial` is a device-side assert that ends the process); it is flagged, and the row's
request fails alone with `NonFiniteOutput`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoramuxError


class NonFiniteOutput(LoramuxError):
    """The model's output for a request is not finite: its mixture (e.g. extreme adapter weights)
    overflowed. The request's fault, so a 400, not a server error."""

    def __init__(self) -> None:
        super().__init__("the model's output is not finite for this request (are its adapter weights extreme?)")


@dataclass(frozen=True)
class RowSampling:
    """What one row asks of its next token."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # on the logits' device; None: the global RNG
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely


@dataclass
class Pick:
    """One row's next token as the host sees it."""

    token: int
    finite: bool
    logprob: float | None = None
    top: dict[int, float] = field(default_factory=dict)


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
    # A mask, not boolean indexing: indexing would wait on the device to learn the kept count.
    filtered = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    return filtered / filtered.sum()


def _sampled(logits: torch.Tensor, greedy: torch.Tensor, p: RowSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, finite) of one row with temperature > 0, as 0-dim tensors on the logits' device."""
    # Shift before scaling: (l - max) / T stays finite-or--inf for any T > 0 (a tiny T such as
    # 1e-39 would turn l / T into inf - inf = nan), so the most likely token always keeps mass.
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
    finite = torch.isfinite(probs).all()
    safe = torch.where(finite, probs, torch.nn.functional.one_hot(greedy, probs.shape[-1]).to(probs))
    return torch.multinomial(top_p_filter(safe, p.top_p), 1, generator=p.generator)[0], finite


def pick(logits: torch.Tensor, rows: list[RowSampling]) -> list[Pick]:
    """The next token of each row of `logits` (B, V), with one device-to-host transfer."""
    logits = logits.float()
    greedy = logits.argmax(-1)  # (B,)
    greedy_finite = torch.isfinite(logits.gather(-1, greedy[:, None]))[:, 0]  # (B,); no per-row indexing by tensor
    tokens, finite = [], []
    for b, p in enumerate(rows):
        if p.temperature == 0:
            tokens.append(greedy[b])
            finite.append(greedy_finite[b])
        else:
            token, ok = _sampled(logits[b], greedy[b], p)
            tokens.append(token)
            finite.append(ok)
    tokens_t = torch.stack(tokens)
    # Every value travels as fp32 in one tensor: token ids (< 2**24 for any vocabulary in use) and
    # flags are exact there, and log-probs are fp32 already.
    parts = [tokens_t.float(), torch.stack(finite).float()]
    asked = [b for b, p in enumerate(rows) if p.logprobs is not None]
    k = max((rows[b].logprobs for b in asked), default=0)
    if asked:
        logp = torch.log_softmax(logits[asked], dim=-1)  # (A, V); `asked` is a host list
        chosen = logp.gather(1, tokens_t[asked][:, None])  # (A, 1)
        top = logp.topk(k, dim=-1) if k else None
        parts += [chosen.reshape(-1)] + ([top.values.reshape(-1), top.indices.float().reshape(-1)] if top else [])
    host = iter(torch.cat(parts).tolist())  # read back in the order `parts` was laid out
    picks = [Pick(int(next(host)), False) for _ in rows]
    for p in picks:
        p.finite = bool(next(host))
    chosen_h = [next(host) for _ in asked]
    values = [[next(host) for _ in range(k)] for _ in asked]
    indices = [[int(next(host)) for _ in range(k)] for _ in asked]
    for a, b in enumerate(asked):
        n = rows[b].logprobs
        picks[b].logprob = chosen_h[a]
        picks[b].finite = picks[b].finite and math.isfinite(chosen_h[a])
        picks[b].top = dict(zip(indices[a][:n], values[a][:n]))
    return picks
