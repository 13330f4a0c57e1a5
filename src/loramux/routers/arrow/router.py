"""Arrow: zero-shot per-token routing over a library of LoRAs (ALGORITHMS.md §4, arXiv 2405.11157).

At every adapted module and for every token h (the module's own input):

    logit_i = |⟨h, v_i⟩| / T        v_i: adapter i's prototype at this module
    keep the top-k logits, softmax over them, zero elsewhere

and the fused layer combines the kept adapters' outputs with those weights (its per-token shape,
via a LayerMixture gate). No training data and no trained parameters. Adapters that do not adapt
a module, or are outside `candidates`, are never chosen there.

`route(prompts)` runs the prompts once and reports, per prompt, the mean weight each adapter
received over its tokens and modules (and per module), so a user can see what Arrow chose.

General knowledge subtraction (`gks=True`; GenKnowSub, Bagherifard et al., ACL 2025; PEFT's
`use_gks`) routes over "purified" adapters ΔW_i − ΔW̄, where ΔW̄ is the mean of the `general`
adapters (or, when none are named, of the routing candidates: the knowledge the library's adapters
share). Both the prototypes (top right singular vector of s_i·B_i·A_i − ΔW̄) and the forward use the
purified deltas. Since a token's routing weights sum to 1, Σ_i c_i (ΔW_i − ΔW̄) = Σ_i c_i ΔW_i − ΔW̄:
the forward is Arrow's mixture plus every general adapter at the constant weight −1/G, exactly,
through the same fused layer. PEFT subtracts the mean A and the mean B factor by factor instead;
that is not ΔW − ΔW̄, and for adapters trained from the same seed (loramux's default), whose A
factors share most of their initialisation, it removes most of each adapter rather than the
shared knowledge. This module subtracts in ΔW space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from ..layerwise import InForwardRouter, per_row_routings, prefill, prompt_batch
from ..routing import Routing
from .prototypes import library_prototypes

if TYPE_CHECKING:
    from ...fusion import FusedModel
    from ...library import Library

KIND = "arrow"


@dataclass(frozen=True)
class ArrowConfig:
    top_k: int = 4  # the paper's k
    temperature: float = 1.0  # the paper's T
    candidates: tuple[str, ...] | None = None  # restrict routing to these (None: all loaded but the library's general)
    prototype: str = "svd"  # "svd": exact; "power": PEFT's seeded power iteration (matches its logits)
    power_iters: int = 15
    power_seed: int = 0
    gks: bool = False  # general knowledge subtraction (see the module docstring)
    general: tuple[str, ...] = ()  # gks: the general adapters (loaded, never routed to); () = the candidates' mean

    def __post_init__(self) -> None:
        if self.prototype not in ("svd", "power"):
            raise LoramuxError(f"Arrow prototype must be 'svd' (exact) or 'power' (PEFT's); got {self.prototype!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise LoramuxError(f"Arrow top_k must be a positive integer; got {self.top_k!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise LoramuxError(f"Arrow temperature must be a finite number > 0; got {self.temperature!r}")
        if self.candidates is not None and not self.candidates:
            raise LoramuxError("Arrow candidates must name at least one adapter (or be None for all)")
        if self.general and not self.gks:
            raise LoramuxError("Arrow general adapters are subtracted only with gks=True")
        if self.gks and self.prototype != "svd":
            raise LoramuxError("Arrow gks prototypes are exact SVDs of the purified deltas; use prototype='svd'")


class _Recorder:
    """Per-row sums of the weights each adapter received, per module, over unmasked tokens."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.float()  # (B, T)
        self.sums: dict[str, torch.Tensor] = {}  # module -> (B, K)

    def add(self, name: str, C: torch.Tensor) -> None:
        if C.shape[:2] != self.mask.shape:
            return  # a decode step: only the prompt is reported
        self.sums[name] = (C.float() * self.mask[..., None]).sum(1)


class ArrowRouter(InForwardRouter):
    kind = KIND
    granularity = "token"

    def __init__(self, fused: "FusedModel", library: "Library | None", config: ArrowConfig = ArrowConfig(), *,
                 prototypes: "Callable[[str], dict[str, torch.Tensor]] | None" = None):
        """`prototypes(name)` overrides where an adapter's prototypes come from (default: the
        library's cache); adapters loaded from plain PEFT dirs use `adapter_prototypes` there."""
        if library is None and prototypes is None:
            raise LoramuxError("ArrowRouter needs the library its adapters came from, or a prototypes function")
        self.fused, self.library, self.config = fused, library, config
        self._own_prototypes = prototypes is None
        self._source = prototypes or (lambda name: library_prototypes(
            library, name, config.prototype, config.power_iters, config.power_seed))
        self._slots: tuple[str, ...] = ()
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the per-module prototype matrices for the adapters loaded now, in slot order."""
        names = tuple(self.fused.adapters)
        if not names:
            raise LoramuxError("Arrow routes between loaded adapters; load some first (FusedModel.load / Engine.load)")
        general = set(self.config.general)
        # the library's general adapter serves abstained prompts; it is never a routing candidate
        served = self.library.general if self.library is not None else None
        wanted = set(self.config.candidates or [n for n in names if n not in general and n != served])
        for what, asked in (("candidates", wanted), ("general adapters", general)):
            unknown = sorted(asked - set(names))
            if unknown:
                raise LoramuxError(f"Arrow {what} {unknown} are not loaded; loaded adapters: {list(names)}")
        if wanted & general:
            raise LoramuxError(f"Arrow general adapters {sorted(wanted & general)} cannot also be routing candidates")
        if served in wanted:
            raise LoramuxError(f"{served!r} is the library's general adapter: it serves abstained prompts and is "
                               f"never a routing candidate")
        subtract = [k for k, n in enumerate(names) if n in (general or wanted)] if self.config.gks else []
        per_adapter = [{} if self.config.gks else self._source(n) for n in names]
        self.prototypes: dict[str, torch.Tensor] = {}  # module -> (K, d_in)
        self.valid: dict[str, torch.Tensor] = {}  # module -> (K,) bool: adapts this module and is a candidate
        for module, layer in self.fused.layers.items():
            d_in = layer.base.in_features
            P = torch.zeros(len(names), d_in, dtype=layer.lora_A.dtype, device=layer.lora_A.device)  # x's dtype there
            ok = torch.zeros(len(names), dtype=torch.bool, device=P.device)
            for k, (name, protos) in enumerate(zip(names, per_adapter)):
                if module in protos and name in wanted:
                    P[k] = protos[module].to(P)
                    ok[k] = True
            if subtract:
                for k, v in _purified_prototypes(layer, [k for k, n in enumerate(names) if n in wanted], subtract):
                    P[k], ok[k] = v.to(P), True
            self.prototypes[module], self.valid[module] = P, ok
        self._slots = names
        self.candidates = [n for n in names if n in wanted]  # what it routes between, in slot order
        # Stable across processes only with the library's prototypes (they follow from the fused
        # adapters, which a cache identifies on its own, and the candidates among them, named when
        # not all); None with a caller's prototypes function.
        some = f"|{self.candidates}" if len(self.candidates) < len(names) else ""
        self.cache_key = f"arrow|{self.config!r}{some}" if self._own_prototypes else None
        weighed = [k for k, n in enumerate(names) if n in wanted or k in subtract]
        self._weighed = None if len(weighed) == len(names) else tuple(weighed)  # the rest: always weight 0
        self._offset = None
        if subtract:  # every general adapter at -1/G, in every module and token
            self._offset = torch.zeros(len(names))
            self._offset[subtract] = -1.0 / len(subtract)
        self._compile()

    def _compile(self) -> None:
        """Per module, what the gate needs in its cheapest form: prototypes transposed with 1/T
        folded in (|⟨h, v⟩| / T = |⟨h, v / T⟩| for T > 0), the mask only where some slot is out,
        and k."""
        self._gate = {}
        for module, P in self.prototypes.items():
            ok = self.valid[module]
            k = min(self.config.top_k, int(ok.sum()))
            offset = None if self._offset is None else self._offset.to(P)
            self._gate[module] = ((P.T / self.config.temperature).contiguous(), None if bool(ok.all()) else ~ok, k,
                                  offset)

    # ------------------------------------------------------------------ the gate
    def gated_slots(self) -> tuple[int, ...] | None:
        """The candidates and the subtracted general adapters; the library's general adapter and
        any adapter left out of `candidates` are never weighed, so the fused layers skip them."""
        return self._weighed

    def gate(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-token weights over all K slots at module `name`: (B, T, K), top-k nonzero per token."""
        if tuple(self.fused.adapters) != self._slots:
            raise LoramuxError("the loaded adapters changed since Arrow's prototypes were built; call refresh()")
        Pt, out, k, offset = self._gate[name]
        logits = (x @ Pt).abs_()  # (B, T, K): |⟨h, v_i⟩| / T
        if out is not None:  # adapters that do not adapt this module, or are not candidates
            logits.masked_fill_(out, float("-inf"))
        top = logits.topk(k, dim=-1)
        C = torch.zeros_like(logits).scatter_(-1, top.indices, torch.softmax(top.values, dim=-1))
        if self._recorder is not None:
            self._recorder.add(name, C)  # the routing decision; the subtraction below is fixed
        return C if offset is None else C + offset

    # ------------------------------------------------------------------ reporting
    def new_recorder(self, attention_mask: torch.Tensor) -> _Recorder:
        return _Recorder(attention_mask)

    def routings(self, recorder: _Recorder) -> list[Routing]:
        """One Routing per row: adapters ranked by mean weight over its tokens and modules."""
        tokens = recorder.mask.sum(1).clamp(min=1)[:, None]  # (B, 1)
        return per_row_routings({m: s / tokens for m, s in recorder.sums.items()}, list(self._slots), router=self.kind,
                                granularity="token",
                                reason=f"per token and module: top-{self.config.top_k} of |<h, prototype>| / "
                                       f"{self.config.temperature}; weights are the mean over tokens and modules"
                                       + ("; general knowledge subtracted" if self.config.gks else ""))

    def route(self, prompts: list[str]) -> list[Routing]:
        """Run the prompts once (chat-formatted like the engine) and report what Arrow chose."""
        ids, mask = prompt_batch(self.fused, prompts)
        return self.routings(prefill(self, self.fused, ids, mask))


def _purified_prototypes(layer, routed: list[int], subtract: list[int]):
    """(slot, prototype) for each routed slot that adapts this module: the top right singular
    vector of s_i·B_i·A_i − mean_g s_g·B_g·A_g, from the stacked factors (rank r·(1+G), never the
    d_out×d_in product)."""
    from .prototypes import top_right_singular_vector

    A, B, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling.double()
    if not bool((s[subtract] != 0).any()):
        subtract = []  # no general adapter adapts this module: nothing to subtract here
    A_g = torch.cat([A[g] for g in subtract]) if subtract else A.new_zeros(0, A.shape[-1])
    B_g = torch.cat([-s[g] / len(subtract) * B[g] for g in subtract], dim=1) if subtract else B.new_zeros(B.shape[1], 0)
    for k in routed:
        if float(s[k]) == 0.0:
            continue  # the adapter does not adapt this module
        yield k, top_right_singular_vector(torch.cat([A[k], A_g]), torch.cat([s[k] * B[k], B_g], dim=1))
