"""The compiled decode path: row slots over a static KV cache, stepped by one compiled graph.

`CompiledDecoder` (one per engine) holds the compiled step; `Slots` (one per running batch, kept
in the scheduler's batch state, so two schedulers over one engine never share one) holds the
rows. The scheduler (the one decode loop, `scheduler.py`) uses them instead of the eager decode
forward when the engine was built with `compile=True`. Prompts are still prefilled eagerly
through the fused layers; each admitted row's keys and values are then copied into a slot of the
static cache, and its mixture into the slot's picks of the batch's table of adapter factors
(an adapter new to the batch copied into the table once), so a step does no per-row
bookkeeping. Every decode step runs `DecodeGraph`
(`graph.py`) over all slots at once; free slots are computed and ignored.

Shapes, and so compiles: the slot count S is a power of two (grown as rows join, one compile each,
with and without LoRA); the cache length L, the LoRA table's positions and width and the
adapters a row mixes are dynamic dimensions, so a longer context or another set of adapters
reuses the graph. The views passed each step cover the
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
_RANK_STEP = 8  # the LoRA table's width at warm-up (a dynamic dimension: any width reuses the graph)
# Dynamo specialises a dimension of size 1, so the table's positions and the adapters per row are
# padded to at least 2: a pick past a row's adapters is position 0 at weight 0, which adds nothing
# because every factor in the table is finite (FusedModel.add_adapter refuses others).
_MIN_DYNAMIC = 2
# One graph per (slot count, with or without LoRA): 1..64 slots is 14, above Dynamo's default of 8,
# and with fullgraph=True hitting the limit raises rather than running uncompiled.
_RECOMPILE_LIMIT = 32
_STANCE_LOCK = threading.Lock()


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def table_width(ranks: list[int]) -> int:
    """The rank columns a table position holds: the rank most adapters have (the larger on a tie),
    so the common adapter fits one position and a rarer wider one (a general adapter) takes
    several; 0 when no adapter adapts anything. At least 2: Dynamo specialises a dimension of size 1."""
    ranks = [r for r in ranks if r > 0]
    if not ranks:
        return 0
    return max(2, max(set(ranks), key=lambda r: (ranks.count(r), r)))


class CompiledDecoder:
    """The compiled step of one engine, and what filling a batch's adapter table needs."""

    def __init__(self, fused: "FusedModel", *, backend: str = "inductor", gemv_rows: int = 4):
        """`backend`: torch.compile's ("eager" runs the same graph without compiling: tests)."""
        self.fused = fused
        self.graph = DecodeGraph(fused.base.model, gemv_rows)  # refuses other families, with the reason
        model = fused.base.model
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        by_module = {id(m): name for name, m in fused.layers.items()}
        # (layer index, projection) -> the fused layer's name, for filling the adapter table
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
            variants = [(None, None, None)]
            if lora and self.fused.adapters:
                n, P, J = len(g.layers), _MIN_DYNAMIC, _MIN_DYNAMIC
                variants.append(({p: (torch.zeros(n, P, _RANK_STEP, self.dims(p)[0], device=self.device),
                                      torch.zeros(n, P, _RANK_STEP, self.dims(p)[1], device=self.device))
                                  for p in PROJECTIONS}, torch.zeros(S, J, dtype=torch.long, device=self.device),
                                 torch.zeros(S, J, device=self.device)))
            for factors, picks, weights in variants:
                tokens = torch.zeros(S, dtype=torch.long, device=self.device)
                self.call(S, tokens, tokens.clone(), keys, values, factors, picks, weights)
            if S >= max_rows:
                return dict(self.compile_seconds)
            S *= 2

    def call(self, S: int, tokens, positions, keys, values, lora, picks, weights) -> torch.Tensor:
        """The compiled step over S slots: the cache length, the LoRA table's positions and width and
        the adapters per row are marked dynamic (one graph serves all); the first call of each
        (S, LoRA or not) is timed."""
        for t in keys + values:
            torch._dynamo.mark_dynamic(t, 0)
        for A, B in (lora or {}).values():
            for t in (A, B):
                torch._dynamo.mark_dynamic(t, 1)
                torch._dynamo.mark_dynamic(t, 2)
        for t in (picks, weights):
            if t is not None:
                torch._dynamo.mark_dynamic(t, 1)
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
        # No duck sizing: L, the table's positions P and width W and the picks per row J are separate
        # dynamic sizes even when equal at the first call (the warm-up passes P = J = 2).
        with _STANCE_LOCK, torch.fx.experimental._config.patch(use_duck_shape=False), \
                torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), stance:
            logits = self._step(tokens, positions, keys, values, lora, picks, weights)
        if not warm:  # the first call compiles (or loads from Inductor's cache)
            self.compile_seconds[name] = round(time.perf_counter() - started, 1)
            log.info("compiled decode step %s in %.1f s", name, self.compile_seconds[name])
        return logits


class Slots:
    """The rows of one running batch: a static KV cache, and the LoRA factors of the adapters its
    rows use, in one table.

    The table holds each adapter the batch's rows mix once, at a position of `width` ranks (its A
    scaled per module, its B); each row picks its adapters' positions and weights (`rows`): its
    update is Σ_j w_j·(x·A_jᵀ)·B_jᵀ over those (every row takes as many picks as the batch's longest
    mixture, the extra ones at weight 0). Sixteen rows mixing 3 of 14 adapters pick among the 14
    adapters' factors held once, where factors copied per row (each row's mixture folded into its own A)
    were 48 copies (~3.4x the bytes; at rank 8 on the default model 470 MB a step, about the
    base's 538). A position whose adapter no row uses any more keeps its factors for a later row
    that mixes it, until a new adapter needs the position.

    Adapters of different ranks: a position holds `width` rank columns, the rank most loaded
    adapters have (`table_width`), and a wider adapter takes as many positions as its rank needs
    (its pieces), each row that mixes it picking all of them at its weight; a narrower one is
    zero-padded within its one position. A rank-112 general adapter beside rank-8 routed ones is 14
    positions of 8 columns, so a batch in which no row mixes it reads 8 columns per adapter, not
    112 (a table padded to the widest rank cost every row that width). The picks per row are the
    batch's longest, so while one row mixes the general adapter every row reads 14 positions
    (zero-weight picks past its own)."""

    def __init__(self, decoder: CompiledDecoder):
        self.decoder = decoder
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer (L, S, n_kv, head_dim)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens in each slot's cache (the next position)
        self.used: list[bool] = []
        self.mixtures: list[dict[str, float] | None] = []
        self.table: list[str | None] = []  # the adapter at each table position
        self.refs: dict[str, int] = {}  # adapter -> used slots that mix it
        self.width = table_width([self._rank(a) for a in decoder.fused.adapters])
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # proj -> A, B (see _grow)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # picks, weights: rows() builds them

    def _grow(self, slots: int, length: int, positions: int) -> None:
        """Reallocate for at least `slots` slots, `length` positions of cache and `positions` table
        positions, keeping what the slots and the table hold. Every new tensor is made before any
        is swapped in: running out of memory half-way leaves the batch as it was."""
        dec, g = self.decoder, self.decoder.graph
        n_layers = len(g.layers)
        S = max(self.capacity, _pow2(slots))
        L = max(self.keys[0].shape[0] if self.keys else 0, length)
        P = max(len(self.table), positions)
        keys, values = self.keys, self.values
        if S != self.capacity or not self.keys or L != self.keys[0].shape[0]:
            keys = [torch.zeros(L, S, g.n_kv, g.head_dim, dtype=dec.dtype, device=dec.device) for _ in range(n_layers)]
            values = [torch.zeros_like(k) for k in keys]
            for new, old in zip(keys + values, self.keys + self.values):
                new[: old.shape[0], : self.capacity] = old
        if P:
            P = max(P, _MIN_DYNAMIC)
        lora, old_P = self.lora, len(self.table)
        if P != old_P:
            lora = {}
            for proj in PROJECTIONS:
                d_in, d_out = dec.dims(proj)
                A = torch.zeros(n_layers, P, self.width, d_in, dtype=torch.float32, device=dec.device)
                B = torch.zeros(n_layers, P, self.width, d_out, dtype=torch.float32, device=dec.device)
                if self.lora is not None:
                    A[:, :old_P] = self.lora[proj][0]
                    B[:, :old_P] = self.lora[proj][1]
                lora[proj] = (A, B)
        extra = S - self.capacity
        self.keys, self.values, self.lora, self.capacity = keys, values, lora, S
        self._rows = None
        self.table += [None] * (P - len(self.table))
        self.lengths += [0] * extra
        self.used += [False] * extra
        self.mixtures += [None] * extra

    def _rank(self, name: str) -> int:
        """Adapter `name`'s widest rank over the modules the step applies. (`name` is loaded: its
        rows were prefilled with it; `_place` looks its slot up with the checked `slot`.)"""
        dec = self.decoder
        k = dec.fused.adapters.index(name)
        return max((int(dec.fused.layers[m].ranks[k]) for m in dec.fused_at.values()), default=0)

    def _pieces(self, name: str) -> int:
        """The table positions adapter `name` takes: its rank in pieces of `width` columns."""
        return max(1, -(-self._rank(name) // self.width))

    def _positions_needed(self, wanted: frozenset[str]) -> int:
        """Table positions for the adapters `wanted` by rows being admitted, on top of the batch's."""
        spare = sum(1 for a in self.table if a is None or (not self.refs.get(a) and a not in wanted))
        new = sum(self._pieces(a) for a in wanted - set(self.table))
        return len(self.table) + max(0, new - spare)

    def _evict(self, name: str) -> None:
        """Forget unused adapter `name`: its positions are free (their factors are overwritten when
        taken)."""
        self.refs.pop(name, None)
        self.table = [None if a == name else a for a in self.table]

    def _place(self, name: str, keep: frozenset[str] = frozenset()) -> list[int]:
        """The table positions holding adapter `name`'s pieces in order, writing its factors into
        free ones if the table does not hold it (admit sized the table for `keep`, the adapters
        wanted by the rows it admits: the positions of an unused adapter are free unless that
        adapter is in `keep`; an adapter is evicted whole, never left with some of its pieces)."""
        if name in self.table:
            return [p for p, a in enumerate(self.table) if a == name]
        dec = self.decoder
        k = dec.fused.slot(name)
        n = self._pieces(name)
        while sum(a is None for a in self.table) < n:
            self._evict(next(a for a in self.table if a is not None and not self.refs.get(a) and a not in keep))
        # free while written: a failure half-way leaves no adapter named at these positions
        where = [p for p, a in enumerate(self.table) if a is None][:n]
        W = self.width
        for (i, proj), module in dec.fused_at.items():
            layer = dec.fused.layers[module]
            A, B = self.lora[proj]
            r = int(layer.ranks[k])  # every fused layer has a slot per adapter; 0 where it does not adapt it
            for j, p in enumerate(where):
                A[i, p] = 0
                B[i, p] = 0
                cols = max(0, min(W, r - j * W))
                if cols:
                    A[i, p, :cols] = layer.lora_A[k, j * W:j * W + cols] * layer.scaling[k]
                    B[i, p, :cols] = layer.lora_B[k, :, j * W:j * W + cols].T
        for p in where:
            self.table[p] = name
        return where

    def _write_mixture(self, slot: int, mixture: dict[str, float] | None, keep: frozenset[str] = frozenset()) -> None:
        """Slot `slot`'s mixture: its adapters placed in the table, and the table's reference counts
        (`keep`: see _place)."""
        if not self.width:  # no loaded adapter adapts anything: every mixture is the base model
            self.mixtures[slot] = dict(mixture) if mixture else None
            return
        for a in self.mixtures[slot] or {}:
            self.refs[a] -= 1
        self.mixtures[slot] = None
        self._rows = None
        # every adapter placed first, then counted: a failure half-way leaves the slot on the base
        # model with nothing counted for it
        for a in mixture or {}:
            self._place(a, keep)
        for a in mixture or {}:
            self.refs[a] = self.refs.get(a, 0) + 1
        self.mixtures[slot] = dict(mixture) if mixture else None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each slot's picks (S, J) of table positions and its weight of each (S, J): a slot's
        adapters in its mixture's order, then position 0 at weight 0 up to the longest mixture
        (at least 2); a free or base-model slot all weight 0. None without a table."""
        if self.lora is None:
            return None
        if self._rows is None:
            where: dict[str, list[int]] = {}  # adapter -> its pieces' positions
            for p, a in enumerate(self.table):
                if a is not None:
                    where.setdefault(a, []).append(p)
            mixes = [[(p, w) for a, w in (m or {}).items() for p in where[a]] for m in self.mixtures]
            J = max([_MIN_DYNAMIC] + [len(m) for m in mixes])
            picks = torch.zeros(self.capacity, J, dtype=torch.long)
            weights = torch.zeros(self.capacity, J, dtype=torch.float32)
            for s, m in enumerate(mixes):
                for j, (p, w) in enumerate(m):
                    picks[s, j], weights[s, j] = p, w
            device = self.decoder.device
            self._rows = (picks.to(device), weights.to(device))
        return self._rows

    def _trim(self) -> None:
        """Drop the table's trailing positions that no row uses once they are most of it: a batch
        that once mixed many adapters and now mixes few would otherwise hold them all (new
        adapters take the lowest free position)."""
        live = max((p + 1 for p, a in enumerate(self.table) if a is not None and self.refs.get(a)), default=0)
        if live:
            live = max(live, _MIN_DYNAMIC)
        dead = len(self.table) - live
        if dead <= len(self.table) // 2:
            return
        lora = {proj: (A[:, :live].clone(), B[:, :live].clone()) for proj, (A, B) in self.lora.items()} if live else None
        dropped = {a for a in self.table[live:] if a is not None}
        for a in dropped:  # unused; one with pieces on both sides of the cut goes whole
            self.refs.pop(a, None)
        table = [None if a in dropped else a for a in self.table[:live]]
        self.lora, self.table, self._rows = lora, table, None

    def admit(self, cache, mask: torch.Tensor, mixtures: list[dict[str, float] | None]) -> list[int]:
        """Take the rows of an eager prefill: `cache` its KV cache (`mask` (B, W): a row's tokens
        are where it is 1, in order; left padding, and a gap after a reused prompt start),
        `mixtures` each row's. Returns the slot each row decodes in. On failure the running rows
        are as they were and none of these rows holds a slot."""
        lengths = mask.sum(-1).tolist()
        free = [s for s, u in enumerate(self.used) if not u]
        need = len(mixtures) - len(free)
        longest = max(lengths + self.lengths)
        wanted = frozenset(a for m in mixtures if m for a in m)
        self._grow(self.capacity + max(need, 0), _round_up(longest + 1, _LENGTH_STEP),
                   self._positions_needed(wanted) if self.width else 0)
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
                self._write_mixture(slot, mixtures[b], wanted)
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
        self._trim()

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
        mixed = self.lora is not None and any(self.mixtures[s] for s in slots)
        picks, weights = self.rows() if mixed else (None, None)
        logits = dec.call(self.capacity, token_row, positions, keys, values, self.lora if mixed else None,
                          picks, weights)
        for s in slots:
            self.lengths[s] += 1
        return logits[torch.tensor(slots, device=logits.device)]
