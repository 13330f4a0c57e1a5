"""What the in-forward routers (Arrow per token, MoLE per layer) share: running a batch of prompts
through the fused model once, and turning per-unit weights into one `Routing` per prompt."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import LoramuxError
from ..training.batching import left_pad
from .routing import Routing

if TYPE_CHECKING:
    from ..fusion import FusedModel


def prompt_batch(fused: "FusedModel", prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, left-padded like the engine's prefill: (input_ids, attention_mask)."""
    from ..data import PromptFormatter

    if isinstance(prompts, str) or not prompts:
        raise LoramuxError("route() takes a non-empty list of prompts; wrap a single prompt in a list")
    fmt = PromptFormatter(fused.base.tokenizer)
    return token_batch(fused, [fmt.encode_prompt(p) for p in prompts])


def token_batch(fused: "FusedModel", rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids left-padded on the model's device: (input_ids, attention_mask)."""
    tokenizer = fused.base.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(rows, pad, device=next(fused.base.model.parameters()).device)


@torch.no_grad()
def forward_prompts(fused: "FusedModel", mixture, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward of a left-padded batch of prompts under `mixture`, positioned as the engine's
    prefill positions them; no cache is kept (routing reads the gates, not the logits)."""
    with fused.mixture(mixture, attention_mask=mask):
        fused.base.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         logits_to_keep=1, use_cache=False)


@torch.no_grad()
def prefill(router, fused: "FusedModel", ids: torch.Tensor, mask: torch.Tensor):
    """One forward with the router's gate active and recording; returns its recorder."""
    try:
        with router.recording(mask) as rec:
            forward_prompts(fused, router.layer_mixture(), ids, mask)
    finally:
        if hasattr(router, "release"):
            router.release()
    return rec


def per_row_routings(units: dict[str, torch.Tensor], adapters: list[str], *, router: str, granularity: str,
                     reason: str) -> list[Routing]:
    """units: unit -> (B, K) mean weights. Each row: adapters ranked by their mean over units."""
    if not units:
        return []
    mean = torch.stack(list(units.values())).float().mean(0)  # (B, K)
    out = []
    for b in range(mean.shape[0]):
        share = {a: round(float(mean[b, k]), 6) for k, a in enumerate(adapters)}
        ranked = sorted(((a, w) for a, w in share.items() if w > 0), key=lambda kv: -kv[1])
        layers = {u: {a: round(float(w[b, k]), 4) for k, a in enumerate(adapters)} for u, w in units.items()}
        out.append(Routing(tuple(a for a, _ in ranked), tuple(w for _, w in ranked), share, router=router,
                           granularity=granularity, layers=layers, reason=reason))
    return out


class InForwardRouter:
    """Base of routers whose gate runs inside the fused layers (the engine's per-token/layer
    protocol): `gate(name, x, mask)` gives the weights, a recorder keeps what a prefill chose."""

    _recorder = None

    def gate(self, name: str, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def new_recorder(self, attention_mask: torch.Tensor):
        raise NotImplementedError

    def recorded(self, recorder) -> None:
        """Called when a prefill's recording ends (MoLE keeps its weights for the decode steps)."""

    def gated_slots(self) -> tuple[int, ...] | None:
        """The fused slots the gate can weigh; None: every loaded adapter."""
        return None

    def layer_mixture(self):
        from ..fusion import LayerMixture

        return LayerMixture(self.gate, self.gated_slots())

    @contextlib.contextmanager
    def recording(self, attention_mask: torch.Tensor) -> Iterator:
        """Record the weights of forwards over inputs shaped like `attention_mask` (a prefill)."""
        self._recorder = self.new_recorder(attention_mask)
        try:
            yield self._recorder
        finally:
            self.recorded(self._recorder)
            self._recorder = None
