"""The compiled decode path: row slots over a static KV cache, stepped by one compiled graph.

`CompiledDecoder` is what the scheduler (the one decode loop, `scheduler.py`) calls instead of
the eager decode forward when it was built with `compile=True`. Prompts are still prefilled
eagerly through the fused layers; each admitted row's keys and values are then copied into a
slot of a static cache, and its mixture into that slot's LoRA factors (its weights and scalings
folded into A once, so a step does no per-row bookkeeping). Every decode step runs `DecodeGraph`
(`graph.py`) over all slots at once; free slots are computed and ignored.

Shapes, and so compiles: the slot count S is a power of two (grown as rows join, one compile each);
the cache length L and the LoRA width R are dynamic dimensions, so a longer context or another
mixture width reuses the graph. The views passed each step cover the first L positions, L the
longest row rounded up to `_LENGTH_STEP`, so attention reads what rows use, not the whole
allocation. Compiled graphs land in Inductor's on-disk cache: a second process with the same
shapes loads them instead of compiling (`compile_seconds` records what each first call cost).

Not covered, decoded eagerly instead (`usable`): in-forward routers (Arrow, MoLE) and adapters with
Dynamic LoRA input gates, whose weights depend on each token's input.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched around the compiled call)

from ..errors import LoramuxError
from .graph import PROJECTIONS, DecodeGraph, unsupported

if TYPE_CHECKING:
    from ..fusion import FusedModel

log = logging.getLogger("loramux.compiled")

_LENGTH_STEP = 64  # the cache view grows in steps of this many positions
_RANK_STEP = 8  # the LoRA width grows in steps of this many ranks


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


class CompiledDecoder:
    """Slots of the running batch and the compiled step over them."""

    def __init__(self, fused: "FusedModel", *, backend: str = "inductor", gemv_rows: int = 4):
        """`backend`: torch.compile's ("eager" runs the same graph without compiling: tests)."""
        model = fused.base.model
        reason = unsupported(model)
        if reason:
            raise LoramuxError(f"compiled decode does not support this model: {reason}")
        self.fused = fused
        self.graph = DecodeGraph(model, gemv_rows)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        by_module = {id(m): name for name, m in fused.layers.items()}
        # (layer index, projection) -> the fused layer's name, for building a slot's factors
        self._fused_at = {}
        for i, layer in enumerate(self.graph.layers):
            for proj in PROJECTIONS:
                owner = layer.self_attn if proj in PROJECTIONS[:4] else layer.mlp
                name = by_module.get(id(getattr(owner, proj)))
                if name is not None:
                    self._fused_at[(i, proj)] = name
        self._step = torch.compile(self.graph, backend=backend, fullgraph=True, dynamic=False)
        self.compile_seconds: dict[str, float] = {}
        self._seen: set[tuple] = set()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every slot and free the cache (the running batch ended)."""
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.used: list[bool] = []
        self.mixtures: list[dict[str, float] | None] = []
        self.rank = 0
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def usable(self) -> bool:
        """Whether rows can decode here: no loaded adapter has input gates. Adapters load and
        unload only between batches, so this holds for a whole batch."""
        return not any(layer.any_gated for layer in self.fused.layers.values())

    def _grow(self, slots: int, length: int, rank: int) -> None:
        """Reallocate for at least `slots` slots, `length` positions and LoRA width `rank`,
        keeping what the used slots hold."""
        cfg = self.graph
        n_layers = len(cfg.layers)
        S = max(self.capacity, _pow2(slots))
        L = max(self.keys[0].shape[0] if self.keys else 0, length)
        if S != self.capacity or not self.keys or L != self.keys[0].shape[0]:
            old_k, old_v, old_S = self.keys, self.values, self.capacity
            self.keys = [torch.zeros(L, S, cfg.n_kv, cfg.head_dim, dtype=self.dtype, device=self.device)
                         for _ in range(n_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
            for new, old in zip(self.keys + self.values, old_k + old_v):
                new[: old.shape[0], :old_S] = old
            self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(S - old_S)])
            self.used += [False] * (S - old_S)
            self.mixtures += [None] * (S - old_S)
        if S != self.capacity or rank > self.rank:
            R = max(self.rank, rank)
            old, old_S = self.lora, self.capacity
            self.lora = None
            if R:
                self.lora = {}
                for proj in PROJECTIONS:
                    d_in, d_out = self._dims(proj)
                    At = torch.zeros(n_layers, S, d_in, R, dtype=torch.float32, device=self.device)
                    Bt = torch.zeros(n_layers, S, R, d_out, dtype=torch.float32, device=self.device)
                    if old is not None:
                        At[:, :old_S, :, : self.rank] = old[proj][0]
                        Bt[:, :old_S, : self.rank] = old[proj][1]
                    self.lora[proj] = (At, Bt)
            self.rank = R
        self.capacity = S

    def _dims(self, proj: str) -> tuple[int, int]:
        layer = self.graph.layers[0]
        owner = layer.self_attn if proj in PROJECTIONS[:4] else layer.mlp
        linear = getattr(getattr(owner, proj), "base", getattr(owner, proj))
        return linear.in_features, linear.out_features

    def _width(self, mixture: dict[str, float] | None) -> int:
        if not mixture:
            return 0
        r = max((self.fused.layers[name].max_rank for name in self._fused_at.values()), default=0)
        return _round_up(len(mixture) * r, _RANK_STEP)

    def _write_mixture(self, slot: int, mixture: dict[str, float] | None) -> None:
        """Slot `slot`'s factors: each adapter's A times its weight and scaling, concatenated along
        the rank (fusion/layer.py's gathered form), zero beyond; all zero for the base model."""
        self.mixtures[slot] = mixture
        if self.lora is None:
            return
        for (At, Bt) in self.lora.values():
            At[:, slot].zero_()
            Bt[:, slot].zero_()
        if not mixture:
            return
        idx = torch.tensor([self.fused.slot(n) for n in mixture], device=self.device)
        weights = torch.tensor(list(mixture.values()), dtype=torch.float32, device=self.device)
        for (i, proj), name in self._fused_at.items():
            layer = self.fused.layers[name]
            r = layer.max_rank
            if r == 0:
                continue
            coef = weights * layer.scaling[idx]
            A = (layer.lora_A[idx] * coef[:, None, None]).reshape(-1, layer.lora_A.shape[-1])  # (m·r, d_in)
            B = layer.lora_B[idx].transpose(1, 2).reshape(-1, layer.lora_B.shape[1])  # (m·r, d_out)
            At, Bt = self.lora[proj]
            At[i, slot, :, : A.shape[0]] = A.T
            Bt[i, slot, : B.shape[0]] = B

    # ------------------------------------------------------------------ rows
    def admit(self, cache, mask: torch.Tensor, mixtures: list[dict[str, float] | None]) -> list[int]:
        """Take the rows of an eager prefill: `cache` its KV cache (left-padded, `mask` (B, W)),
        `mixtures` each row's. Returns the slot each row decodes in."""
        lengths = mask.sum(-1).tolist()
        free = [s for s, u in enumerate(self.used) if not u]
        need = len(mixtures) - len(free)
        width = max([self._width(m) for m in mixtures] + [self.rank])
        longest = max(lengths + [int(self.lengths.max()) if self.capacity else 0])
        self._grow(self.capacity + max(need, 0), _round_up(longest + 1, _LENGTH_STEP), width)
        free = [s for s, u in enumerate(self.used) if not u][: len(mixtures)]
        W = mask.shape[1]
        try:
            for b, (slot, n) in enumerate(zip(free, lengths)):
                self.used[slot] = True
                for i, layer in enumerate(cache.layers):  # (B, n_kv, W, D), the row's tokens last
                    self.keys[i][:n, slot] = layer.keys[b, :, W - n:].transpose(0, 1).to(self.dtype)
                    self.values[i][:n, slot] = layer.values[b, :, W - n:].transpose(0, 1).to(self.dtype)
                self.lengths[slot] = n
                self._write_mixture(slot, mixtures[b])
        except BaseException:  # the running rows keep their slots; these rows were never admitted
            self.free([s for s in free if self.used[s]])
            raise
        return free

    def free(self, slots: list[int]) -> None:
        for s in slots:
            self.used[s] = False
            self.lengths[s] = 0
            self._write_mixture(s, None)
            for t in self.keys + self.values:  # nothing of this row (a non-finite value included) reaches the next
                t[:, s].zero_()

    @torch.no_grad()
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed each slot its next token; returns their next-token logits (len(slots), vocab)."""
        if not slots:
            raise LoramuxError("no rows to decode")
        longest = int(self.lengths[slots].max()) + 1
        if longest > self.keys[0].shape[0]:
            self._grow(self.capacity, _round_up(max(longest, 2 * self.keys[0].shape[0]), _LENGTH_STEP), 0)
        L = _round_up(longest, _LENGTH_STEP)
        index = torch.tensor(slots, device=self.device)
        token_row = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        token_row[index] = torch.tensor(tokens, device=self.device)
        positions = self.lengths.to(self.device)
        keys, values = [k[:L] for k in self.keys], [v[:L] for v in self.values]
        for t in keys + values:
            torch._dynamo.mark_dynamic(t, 0)
        lora = None
        if self.lora is not None and any(self.mixtures[s] for s in slots):
            lora = self.lora
            for At, Bt in lora.values():
                torch._dynamo.mark_dynamic(At, 3)
                torch._dynamo.mark_dynamic(Bt, 2)
        key = (self.capacity, lora is not None)
        started = time.perf_counter()
        # No duck sizing: L and R are separate dynamic sizes even when equal at the first call.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            logits = self._step(token_row, positions, keys, values, lora)
        if key not in self._seen:  # the first call of a shape compiles (or loads from the cache)
            self._seen.add(key)
            seconds = time.perf_counter() - started
            self.compile_seconds[f"rows{key[0]}{'_lora' if key[1] else ''}"] = round(seconds, 1)
            log.info("compiled decode for %d row slot(s)%s in %.1f s", key[0], " with LoRA" if key[1] else "", seconds)
        self.lengths[index] += 1
        return logits[index]
