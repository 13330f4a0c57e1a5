"""The compiled decode path: row slots over a static KV cache, stepped by one compiled graph.

`CompiledDecoder` (one per engine) holds the compiled step; `Slots` (one per running batch, kept
in the scheduler's batch state, so two schedulers over one engine never share one) holds the
rows. The scheduler (the one decode loop, `scheduler.py`) uses them instead of the eager decode
forward when the engine was built with `compile=True`. Prompts are still prefilled eagerly
through the fused layers; each admitted row's keys and values are then copied into a slot of the
static cache, and its mixture into that slot's LoRA factors (its weights and scalings folded
into A once, so a step does no per-row bookkeeping). Every decode step runs `DecodeGraph`
(`graph.py`) over all slots at once; free slots are computed and ignored.

Shapes, and so compiles: the slot count S is a power of two (grown as rows join, one compile each,
with and without LoRA); the cache length L and the LoRA width R are dynamic dimensions, so a
longer context or another mixture width reuses the graph. The views passed each step cover the
first L positions, L the longest row rounded up to `_LENGTH_STEP`, so attention reads what rows
use, not the whole allocation. Compiled graphs land in Inductor's on-disk cache: a second process
with the same shapes loads them instead of compiling (`compile_seconds` records what each first
call cost).

Not covered, decoded eagerly instead (`usable`): in-forward routers (Arrow, MoLE), adapters with
Dynamic LoRA input gates (their weights depend on each token's input), and fused modules other
than the seven projections of a Llama block.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched around the compiled call)

from ..errors import LoramuxError
from .graph import PROJECTIONS, DecodeGraph, _linear

if TYPE_CHECKING:
    from ..fusion import FusedModel

log = logging.getLogger("loramux.compiled")

_LENGTH_STEP = 64  # the cache view grows in steps of this many positions
_RANK_STEP = 8  # the LoRA width grows in steps of this many ranks
# One graph per (slot count, with or without LoRA): 1..64 slots is 14, above Dynamo's default of 8,
# and with fullgraph=True hitting the limit raises rather than running uncompiled.
_RECOMPILE_LIMIT = 32
_STANCE_LOCK = threading.Lock()


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


class CompiledDecoder:
    """The compiled step of one engine, and what building a slot's factors needs."""

    def __init__(self, fused: "FusedModel", *, backend: str = "inductor", gemv_rows: int = 4):
        """`backend`: torch.compile's ("eager" runs the same graph without compiling: tests)."""
        self.fused = fused
        self.graph = DecodeGraph(fused.base.model, gemv_rows)  # refuses other families, with the reason
        model = fused.base.model
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        by_module = {id(m): name for name, m in fused.layers.items()}
        # (layer index, projection) -> the fused layer's name, for building a slot's factors
        self.fused_at: dict[tuple[int, str], str] = {}
        for i, layer in enumerate(self.graph.layers):
            for proj in PROJECTIONS:
                name = by_module.get(id(self.graph.module(layer, proj)))
                if name is not None:
                    self.fused_at[(i, proj)] = name
        self._step = torch.compile(self.graph, backend=backend, fullgraph=True, dynamic=False)
        self.compile_seconds: dict[str, float] = {}

    def usable(self) -> bool:
        """Whether rows can decode here: no loaded adapter has input gates, and every fused layer is
        one the graph applies. Adapters load and unload only between batches, so this holds for a
        whole batch."""
        return (len(self.fused_at) == len(self.fused.layers)
                and not any(layer.any_gated for layer in self.fused.layers.values()))

    def slots(self) -> "Slots":
        """Empty slots for a new batch."""
        return Slots(self)

    def dims(self, proj: str) -> tuple[int, int]:
        linear = _linear(self.graph.module(self.graph.layers[0], proj))
        return linear.in_features, linear.out_features

    @torch.no_grad()
    def warmup(self, max_rows: int, lora: bool = True) -> dict[str, float]:
        """Compile (or load from Inductor's cache) the step for every slot count up to `max_rows`,
        without and (if `lora` and adapters are loaded) with LoRA, so that no request waits for a
        compile. Returns the seconds each took."""
        g = self.graph
        S = 1
        while True:
            keys = [torch.zeros(_LENGTH_STEP, S, g.n_kv, g.head_dim, dtype=self.dtype, device=self.device)
                    for _ in g.layers]
            values = [torch.zeros_like(k) for k in keys]
            variants = [None]
            if lora and self.fused.adapters:
                variants.append({p: (torch.zeros(len(g.layers), S, self.dims(p)[0], _RANK_STEP, device=self.device),
                                     torch.zeros(len(g.layers), S, _RANK_STEP, self.dims(p)[1], device=self.device))
                                 for p in PROJECTIONS})
            for factors in variants:
                tokens = torch.zeros(S, dtype=torch.long, device=self.device)
                self.call(S, tokens, tokens.clone(), keys, values, factors)
            if S >= max_rows:
                return dict(self.compile_seconds)
            S *= 2

    def call(self, S: int, tokens, positions, keys, values, lora) -> torch.Tensor:
        """The compiled step over S slots: the cache length and the LoRA width are marked dynamic
        (one graph serves all); the first call of each (S, LoRA or not) is timed."""
        for t in keys + values:
            torch._dynamo.mark_dynamic(t, 0)
        for At, Bt in (lora or {}).values():
            torch._dynamo.mark_dynamic(At, 3)
            torch._dynamo.mark_dynamic(Bt, 2)
        name = f"rows{S}{'_lora' if lora is not None else ''}"
        warm = name in self.compile_seconds
        started = time.perf_counter()
        # Once a shape is compiled, only the guards that tell the graphs apart are checked: the
        # rest (every weight and cache tensor of the call, ~340 inputs) cost about as much as a
        # tenth of a one-row step. The inputs' tensor guards are still checked; what is assumed is
        # that the model is not changed in place once compiled (packed, unpacked, cast): adapters
        # load into the fused layers' buffers, which the step does not read. A shape not compiled
        # yet takes the full check. (A compile-time guard filter on the modules would be
        # per-function, but Dynamo's filter failed on Int8Linear's int8 `weight` when it was a buffer.)
        # The stance is process-wide: the lock keeps two threads stepping compiled code from
        # interleaving its set and restore (which could leave it on for a cold call). Not covered:
        # `torch._dynamo.reset()` under a decoder already warm (its next calls would skip the checks
        # of graphs compiled afresh); the engine never resets Dynamo.
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if warm else nullcontext()
        # No duck sizing: L and R are separate dynamic sizes even when equal at the first call.
        with _STANCE_LOCK, torch.fx.experimental._config.patch(use_duck_shape=False), \
                torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), stance:
            logits = self._step(tokens, positions, keys, values, lora)
        if not warm:  # the first call compiles (or loads from Inductor's cache)
            self.compile_seconds[name] = round(time.perf_counter() - started, 1)
            log.info("compiled decode step %s in %.1f s", name, self.compile_seconds[name])
        return logits


class Slots:
    """The rows of one running batch: a static KV cache and LoRA factors, slot by slot."""

    def __init__(self, decoder: CompiledDecoder):
        self.decoder = decoder
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer (L, S, n_kv, head_dim)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens in each slot's cache (the next position)
        self.used: list[bool] = []
        self.mixtures: list[dict[str, float] | None] = []
        self.rank = 0
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _grow(self, slots: int, length: int, rank: int) -> None:
        """Reallocate for at least `slots` slots, `length` positions and LoRA width `rank`, keeping
        what the slots hold. Every new tensor is made before any is swapped in: running out of
        memory half-way leaves the batch as it was."""
        dec, g = self.decoder, self.decoder.graph
        n_layers = len(g.layers)
        S = max(self.capacity, _pow2(slots))
        L = max(self.keys[0].shape[0] if self.keys else 0, length)
        R = max(self.rank, rank)
        keys, values = self.keys, self.values
        if S != self.capacity or not self.keys or L != self.keys[0].shape[0]:
            keys = [torch.zeros(L, S, g.n_kv, g.head_dim, dtype=dec.dtype, device=dec.device) for _ in range(n_layers)]
            values = [torch.zeros_like(k) for k in keys]
            for new, old in zip(keys + values, self.keys + self.values):
                new[: old.shape[0], : self.capacity] = old
        lora = self.lora
        if R and (S != self.capacity or R != self.rank):
            lora = {}
            for proj in PROJECTIONS:
                d_in, d_out = dec.dims(proj)
                At = torch.zeros(n_layers, S, d_in, R, dtype=torch.float32, device=dec.device)
                Bt = torch.zeros(n_layers, S, R, d_out, dtype=torch.float32, device=dec.device)
                if self.lora is not None:
                    At[:, : self.capacity, :, : self.rank] = self.lora[proj][0]
                    Bt[:, : self.capacity, : self.rank] = self.lora[proj][1]
                lora[proj] = (At, Bt)
        extra = S - self.capacity
        self.keys, self.values, self.lora, self.rank, self.capacity = keys, values, lora, R, S
        self.lengths += [0] * extra
        self.used += [False] * extra
        self.mixtures += [None] * extra

    def _width(self, mixture: dict[str, float] | None) -> int:
        if not mixture:
            return 0
        dec = self.decoder
        r = max((dec.fused.layers[name].max_rank for name in dec.fused_at.values()), default=0)
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
        dec = self.decoder
        idx = torch.tensor([dec.fused.slot(n) for n in mixture], device=dec.device)
        weights = torch.tensor(list(mixture.values()), dtype=torch.float32, device=dec.device)
        for (i, proj), name in dec.fused_at.items():
            layer = dec.fused.layers[name]
            if layer.max_rank == 0:  # no loaded adapter adapts this module
                continue
            coef = weights * layer.scaling[idx]
            A = (layer.lora_A[idx] * coef[:, None, None]).reshape(-1, layer.lora_A.shape[-1])  # (m·r, d_in)
            B = layer.lora_B[idx].transpose(1, 2).reshape(-1, layer.lora_B.shape[1])  # (m·r, d_out)
            At, Bt = self.lora[proj]
            At[i, slot, :, : A.shape[0]] = A.T
            Bt[i, slot, : B.shape[0]] = B

    def admit(self, cache, mask: torch.Tensor, mixtures: list[dict[str, float] | None]) -> list[int]:
        """Take the rows of an eager prefill: `cache` its KV cache (`mask` (B, W): a row's tokens
        are where it is 1, in order; left padding, and a gap after a reused prompt start),
        `mixtures` each row's. Returns the slot each row decodes in. On failure the running rows
        are as they were and none of these rows holds a slot."""
        lengths = mask.sum(-1).tolist()
        free = [s for s, u in enumerate(self.used) if not u]
        need = len(mixtures) - len(free)
        width = max(self._width(m) for m in mixtures)
        longest = max(lengths + self.lengths)
        self._grow(self.capacity + max(need, 0), _round_up(longest + 1, _LENGTH_STEP), width)
        free = [s for s, u in enumerate(self.used) if not u][: len(mixtures)]
        dtype = self.decoder.dtype
        try:
            for b, (slot, n) in enumerate(zip(free, lengths)):
                self.used[slot] = True
                where = mask[b].nonzero().squeeze(-1)
                for i, layer in enumerate(cache.layers):  # (B, n_kv, W, D)
                    self.keys[i][:n, slot] = layer.keys[b][:, where].transpose(0, 1).to(dtype)
                    self.values[i][:n, slot] = layer.values[b][:, where].transpose(0, 1).to(dtype)
                self.lengths[slot] = n
                self._write_mixture(slot, mixtures[b])
        except BaseException:
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
        dec = self.decoder
        longest = max(self.lengths[s] for s in slots) + 1
        if longest > self.keys[0].shape[0]:
            self._grow(self.capacity, _round_up(max(longest, 2 * self.keys[0].shape[0]), _LENGTH_STEP), 0)
        L = _round_up(longest, _LENGTH_STEP)
        row_tokens = [0] * self.capacity
        for s, t in zip(slots, tokens):
            row_tokens[s] = t
        token_row = torch.tensor(row_tokens, device=dec.device)
        positions = torch.tensor(self.lengths, device=dec.device)
        keys, values = [k[:L] for k in self.keys], [v[:L] for v in self.values]
        lora = self.lora if self.lora is not None and any(self.mixtures[s] for s in slots) else None
        logits = dec.call(self.capacity, token_row, positions, keys, values, lora)
        for s in slots:
            self.lengths[s] += 1
        return logits[torch.tensor(slots, device=logits.device)]
