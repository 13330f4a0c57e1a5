"""MultiLoraLinear: one frozen linear layer plus K LoRA adapters stacked in slots.

For a mixture with weights w over the slots it computes, exactly and in output space
(ALGORITHMS.md, "the exact fused output of one layer"):

    y = W0·x + Σ_i w_i · s_i · B_i · (A_i · x)

Every router's decision arrives as one of three shapes (see `mixture.py`); all three reduce to a
dense coefficient tensor C of shape (B, T or 1, K), which is what the reference path uses:

    for i in range(K):                       # reference: a plain loop over adapters
        y += C[..., i] * s_i * B_i (A_i x)

The fast path for per-sequence mixtures gathers only the m selected adapters of each row and
concatenates them along the rank (PEFT's exact "cat" form, per row), with each rank block's
weight w·s applied to the rank-m·r intermediate:

    A_cat[b] = [A_{i1}; …; A_{im}]            # (B, m·r, d_in)
    B_cat[b] = [B_{i1}, …, B_{im}]            # (B, d_out, m·r)
    c[b]     = [w1 s1 (r times), …, wm sm]    # (B, m·r)
    y = W0·x + bmm(bmm(x, A_catᵀ) ⊙ c, B_catᵀ)

The gathered factors are cached per mixture object, so a decode loop pays the gather once.
Off CPU, decoding many rows that each mix their own adapters takes a third form instead: the
union of the slots any row selects, read once as one rank-U·r LoRA whose rank blocks each row
weights with its own coefficients (fewer bytes than a gathered copy per row, more FLOPs; see
`_reads_fewer_union`).
When every row has the same mixture the batched matmuls become two plain ones, and with
`state.fold` the mixture is folded once into a copy of the base weight, W' = W0 + B_cat·diag(c)·A_cat,
so a long decode with one mixture costs exactly a base forward per step (at the price of one
extra copy of each adapted weight while that mixture is in use).
Ranks may differ: slots are stored zero-padded to the largest rank (the reference loop, the
gates and Arrow read that stack), but every fast path lays out each slot's own rank alone, so a
high-rank adapter beside low-rank ones (a library's general adapter, say) widens only itself: the
flat layouts keep the Σ r_i real rank columns, and a gathered row keeps its selected slots' real
columns, padded only to the widest row of the batch (zero rows of the stack, so the sum is exact).

Precision: the factors are kept in fp32 whatever the base's dtype (`factor_dtype`), as PEFT keeps
LoRA weights (its `autocast_adapter_dtype`). Over a bf16/fp16 base the update is computed in fp32 on
x cast up and added to the base output in fp32 before one rounding back, which is PEFT's order too;
a mixture is then never folded into the weights: W0 + ΔW rounded to bf16 loses most of a small ΔW
(its 8-bit mantissa keeps ~2-3 significant digits of W0) and would make a row's output depend on
whether its batch shared the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LoramuxError
from .mixture import LayerMixture, Mixture, SequenceMixture


def _split(counts: torch.Tensor, saves: float) -> tuple[torch.Tensor, int] | None:
    """The narrow group of rows (host index, its width) that splitting rows of these real-column
    `counts` into two groups, each padded to its widest row, makes; None when that saves less
    than `saves` of the columns padding every row to the widest one costs."""
    widest, best = int(counts.max()), None
    padded = counts.numel() * widest
    for t in sorted(set(counts.tolist()))[:-1]:
        cost = int((counts <= t).sum()) * t + int((counts > t).sum()) * widest
        if cost <= (1 - saves) * padded and (best is None or cost < best[1]):
            best = (t, cost)
    return None if best is None else ((counts <= best[0]).nonzero()[:, 0], best[0])


@dataclass
class FusionState:
    """Shared by all fused layers of one model: what the current forward should mix."""

    mixture: Mixture | None = None
    attention_mask: torch.Tensor | None = None  # (B, T), for gates that pool over tokens
    reference: bool = False  # use the plain loop instead of the fast path (tests, debugging)
    fold: bool = False  # fold a mixture shared by every row into a copy of the base weights
    extra: dict[str, Any] = field(default_factory=dict)


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, state: FusionState, factor_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.name = name
        self.state = state
        d_in, d_out = base.in_features, base.out_features
        dtype, device = factor_dtype, base.weight.device
        # Not parameters and not in state_dict: adapters are loaded and unloaded at runtime.
        self.register_buffer("lora_A", torch.zeros(0, 0, d_in, dtype=dtype, device=device), persistent=False)  # (K, r, d_in)
        self.register_buffer("lora_B", torch.zeros(0, d_out, 0, dtype=dtype, device=device), persistent=False)  # (K, d_out, r)
        self.register_buffer("scaling", torch.zeros(0, dtype=dtype, device=device), persistent=False)  # (K,)
        # Dynamic LoRA input gates, per slot: g_k(x) = 2·sigmoid(gate_w[k]·x + gate_b[k]); a slot
        # without one has gate_w = 0, gate_b = 0 and is not gated (`gated` False).
        self.register_buffer("gate_w", torch.zeros(0, d_in, dtype=dtype, device=device), persistent=False)  # (K, d_in)
        self.register_buffer("gate_b", torch.zeros(0, dtype=dtype, device=device), persistent=False)  # (K,)
        # (K,) each slot's own rank, on the host: a gathered mixture's widths are read there, never
        # waiting on the device (its indices are made on the host too: FusedModel.sequence_mixture)
        self.ranks = torch.zeros(0, dtype=torch.long, device="cpu")
        self.gated: list[bool] = []
        self.any_gated = False
        self._cache: tuple | None = None
        self._folded: tuple | None = None
        self._flat: tuple | None = None
        self._union: tuple | None = None
        self._some: dict | None = None  # slots -> their flat layout (`_some_flat`)

    # ------------------------------------------------------------------ slots
    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def add_slot(self, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
                 gate: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append one adapter: A (r, d_in), B (d_out, r); None when it does not adapt this layer.
        `gate`: a Dynamic LoRA input gate (w (1, d_in), b (1,)) scaling this slot per token."""
        r = A.shape[0] if A is not None else 0
        width = max(self.max_rank, r)
        K = self.num_slots
        new_A = self.lora_A.new_zeros(K + 1, width, self.base.in_features)
        new_B = self.lora_B.new_zeros(K + 1, self.base.out_features, width)
        new_A[:K, : self.max_rank] = self.lora_A
        new_B[:K, :, : self.max_rank] = self.lora_B
        if A is not None:
            new_A[K, :r] = A.to(new_A)
            new_B[K, :, :r] = B.to(new_B)
        self.lora_A, self.lora_B = new_A, new_B
        self.scaling = torch.cat([self.scaling, self.scaling.new_tensor([scaling if A is not None else 0.0])])
        self.ranks = torch.cat([self.ranks, torch.tensor([r], device="cpu")])
        w = gate[0].reshape(1, -1).to(self.gate_w) if gate is not None else self.gate_w.new_zeros(1, self.base.in_features)
        b = gate[1].reshape(1).to(self.gate_b) if gate is not None else self.gate_b.new_zeros(1)
        self.gate_w, self.gate_b = torch.cat([self.gate_w, w]), torch.cat([self.gate_b, b])
        self.gated.append(gate is not None and A is not None)
        self.any_gated = any(self.gated)
        self._cache = self._folded = self._flat = self._union = self._some = None

    def move_slot(self, src: int, dst: int) -> None:
        """Move slot `src` to index `dst` (the others keep their order): a replaced adapter keeps
        the slot number clients know it by."""
        order = [i for i in range(self.num_slots) if i != src]
        order.insert(dst, src)
        self.lora_A, self.lora_B, self.scaling = self.lora_A[order], self.lora_B[order], self.scaling[order]
        self.ranks = self.ranks[order]
        self.gate_w, self.gate_b = self.gate_w[order], self.gate_b[order]
        self.gated = [self.gated[i] for i in order]
        self._cache = self._folded = self._flat = self._union = self._some = None

    def remove_slot(self, k: int) -> None:
        keep = [i for i in range(self.num_slots) if i != k]
        self.lora_A, self.lora_B, self.scaling = self.lora_A[keep], self.lora_B[keep], self.scaling[keep]
        self.ranks = self.ranks[keep]
        if self.ranks.numel() and int(self.ranks.max()) < self.max_rank:  # the widest slot left: narrow the stack
            r = int(self.ranks.max())
            self.lora_A, self.lora_B = self.lora_A[:, :r].contiguous(), self.lora_B[:, :, :r].contiguous()
        self.gate_w, self.gate_b = self.gate_w[keep], self.gate_b[keep]
        self.gated.pop(k)
        self.any_gated = any(self.gated)
        self._cache = self._folded = self._flat = self._union = self._some = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.state.mixture
        if mix is None or self.lora_A.shape[1] == 0:  # no mixture, or no loaded adapter adapts this layer
            return self.base(x)
        if x.dtype != self.lora_A.dtype:  # a half-precision base: the update in the factors' dtype (see top)
            return self._adapted(x.to(self.lora_A.dtype), mix, lambda: self.base(x).to(self.lora_A.dtype)).to(x.dtype)
        return self._adapted(x, mix, lambda: self.base(x))

    def _adapted(self, x: torch.Tensor, mix: Mixture, base_out) -> torch.Tensor:
        """W0·x + the mixture's update; x is in the factors' dtype and `base_out()` gives W0·x in it."""
        state = self.state
        if type(mix) is SequenceMixture and not state.reference and not self.any_gated:  # the hot path
            if state.fold and self.base.weight.dtype == self.lora_A.dtype and self.lora_A.element_size() >= 4:  # never in half precision (see top)
                weight = self._folded_weight(mix, x.device)  # the folded weight replaces the base matmul
                if weight is not None:
                    return torch.nn.functional.linear(x, weight, self.base.bias)
            if self._reads_fewer_union(x, mix):
                return self._add_union_delta(base_out(), x, mix)
            return self._add_sequence_delta(base_out(), x, mix)
        y = base_out()
        squeeze = x.dim() == 2  # (N, d_in) inputs are treated as (N, 1, d_in)
        x3 = x[:, None] if squeeze else x
        slots = mix.slots if isinstance(mix, LayerMixture) else None
        if state.reference:
            delta = self.reference_delta(x3, mix)
            if slots is not None:  # the fast path computes only these: the reference checks the gate keeps to them
                outside = torch.ones(self.num_slots, dtype=torch.bool)
                outside[list(slots)] = False
                if bool(self.dense_weights(x3, mix)[..., outside.to(x.device)].any()):
                    raise LoramuxError(f"gate at {self.name} weighs slots outside LayerMixture.slots {slots}; the "
                                       f"fast path would drop them")
        else:
            # Per-token top-k weights (Arrow) go through the dense path: running each adapter
            # only on the tokens that chose it (a grouped GEMM) measured 1.1-1.4x slower than
            # dense over all K=14 slots on the 2-core CPU (batch 8 x 96, top-4), because it
            # materialises k outputs per token before scattering them back.
            C = self.dense_weights(x3, mix)
            if slots and slots[-1] >= self.num_slots:
                raise LoramuxError(f"layer mixture: slot {slots[-1]} does not exist at {self.name} ({self.num_slots} slots)")
            if slots is not None and len(slots) < self.num_slots:  # the gate weighs only these (mixture.py)
                *flat, index = self._some_flat(slots)
                return self._add_dense_delta(y, x3, C[..., index], flat, self.scaling[index])
            return self._add_dense_delta(y, x3, C, self._all_flat(), self.scaling)
        return y + (delta[:, 0] if squeeze else delta).to(y.dtype)

    def dense_weights(self, x: torch.Tensor, mix: Mixture) -> torch.Tensor:
        """The mixture as dense coefficients C over all K slots: (B, T or 1, K), times each gated
        slot's per-token input gate (then (B, T, K))."""
        C = self._mixture_weights(x, mix)
        if self.any_gated:
            on = torch.tensor(self.gated, device=x.device)
            g = 2 * torch.sigmoid(x @ self.gate_w.T + self.gate_b)  # (B, T, K)
            C = C * torch.where(on, g, torch.ones_like(g))
        return C

    def _mixture_weights(self, x: torch.Tensor, mix: Mixture) -> torch.Tensor:
        K = self.num_slots
        if isinstance(mix, LayerMixture):
            C = mix.gate(self.name, x, self.state.attention_mask).to(x.dtype)  # (B, K) or (B, T, K)
            if C.shape[-1] != K or C.dim() not in (2, 3):
                raise LoramuxError(f"gate at {self.name} returned weights of shape {tuple(C.shape)}; expected "
                                   f"(B, {K}) per sequence or (B, T, {K}) per token")
            return C[:, None, :] if C.dim() == 2 else C
        indices = mix.indices.to(x.device).long()
        weights = mix.weights.to(device=x.device, dtype=x.dtype)
        if isinstance(mix, SequenceMixture):  # (B, m) -> (B, 1, K)
            indices, weights = indices[:, None], weights[:, None]
        dense = x.new_zeros(*indices.shape[:2], K)
        return dense.scatter_add_(-1, indices, weights)  # repeated slots add up

    def reference_delta(self, x: torch.Tensor, mix: Mixture) -> torch.Tensor:
        """Σ_i C[..., i] · s_i · B_i (A_i x), one adapter at a time. x: (B, T, d_in)."""
        C = self.dense_weights(x, mix)
        delta = x.new_zeros(*x.shape[:2], self.base.out_features)
        for i in range(self.num_slots):
            delta += C[..., i : i + 1] * self.scaling[i] * ((x @ self.lora_A[i].T) @ self.lora_B[i].T)
        return delta

    def _add_dense_delta(self, y: torch.Tensor, x: torch.Tensor, C: torch.Tensor, flat: tuple,
                         scaling: torch.Tensor) -> torch.Tensor:
        """y + the slots of `flat` (`_flat_factors`) as one rank-Σr LoRA, each slot's rank columns
        scaled by its coefficient in C (B, T or 1, slots) times its `scaling` (slots,). x: (B, T, d_in);
        y: the base output, (B, T, d_out) or (B, d_out) for 2-D inputs."""
        At, Bt, owner = flat
        if owner.numel() == 0:  # none of these slots adapts this layer
            return y
        z = x @ At  # (B, T, Σr)
        coef = (C * scaling)[..., owner]  # each rank column times its slot's weight
        if (torch.is_grad_enabled() and (C.requires_grad or x.requires_grad or y.requires_grad)) \
                or z.dtype != y.dtype or not y.is_contiguous():  # training gates: autograd needs z
            delta = ((z * coef) @ Bt).to(y.dtype)  # (B, T, d_out)
            return y + (delta[:, 0] if y.dim() == 2 else delta)
        z.mul_(coef)
        # The second matmul accumulates into y, the base output made for this call: an
        # out-of-place y + delta wrote two more output-sized tensors per layer.
        y.view(-1, y.shape[-1]).addmm_(z.view(-1, z.shape[-1]), Bt)
        return y

    def _all_flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every slot's factors as one rank-Σr pair, laid out once per set of slots."""
        if self._flat is None:
            self._flat = self._flat_factors(torch.arange(self.num_slots, device="cpu"))
        return self._flat

    _SOME_KEPT = 4  # slot sets whose layouts are kept (a server alternating Arrow and MoLE has 2)

    def _some_flat(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_flat_factors` of these slots and the slots as a device tensor, kept per set of slots (a
        router asks for the same set at every layer and step)."""
        if self._some is None:
            self._some = {}
        if slots not in self._some:
            if len(self._some) >= self._SOME_KEPT:
                self._some.pop(next(iter(self._some)))
            host = torch.tensor(slots, dtype=torch.long, device="cpu")
            self._some[slots] = (*self._flat_factors(host), host.to(self.lora_A.device))
        return self._some[slots]

    def _flat_factors(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen slots' (a host tensor) factors as one LoRA of their real ranks, padding left
        out: At (d_in, Σr), Bt (Σr, d_out), and owner (Σr,), the position in `slots` of each rank
        column's slot. The row index is made on the host and copied once: no wait on the device."""
        R, device = self.max_rank, self.lora_A.device
        real = torch.arange(R) < self.ranks[slots][:, None]  # (U, R)
        rows = (slots[:, None] * R + torch.arange(R))[real].to(device)  # (Σr,) rows of the (K·R)-row stack
        owner = torch.arange(slots.numel())[:, None].expand(-1, R)[real].to(device)
        A = self.lora_A.reshape(-1, self.base.in_features).index_select(0, rows)
        B = self.lora_B.transpose(1, 2).reshape(-1, self.base.out_features).index_select(0, rows)
        return A.T.contiguous(), B.contiguous(), owner

    # Measured on the 2-core CPU (fp32; benchmarks/results/cpu_profile.json, "gemm"): with the
    # narrow factors as contiguous matrices a one-row LoRA update is ~1.9x faster (decode); with
    # 768 rows (prefill) a transposed view of A was as fast or faster (1.0-1.1x there, up to 1.3x
    # in an earlier run). The row count picks the layout; each is made only when first asked for.
    _MANY_ROWS = 64

    # Rows whose selections differ much in width (a wide general adapter serving the prompts a
    # router abstained on, beside narrow routed ones) are split in two groups, each padded to its
    # own widest row, when that saves at least this share of the padded columns.
    _SPLIT_SAVES = 0.25

    def _gathered(self, mix: SequenceMixture, device: torch.device, rows: int = 1) -> list[tuple]:
        """Per-row concatenated factors of the selected adapters, cached for this mixture object,
        as groups of rows (rows, At, Bt, coef): rows None (every row) or a device index; At
        (B', d_in, c), Bt (B', c, d_out) and the coefficient w·s of each rank column, coef (B', 1, c);
        2-D factors and coef (c,) when every row mixes the same way (one group, B' = 1). c is the
        most real rank columns a row of the group selects: m·r when each selected slot has the
        stack's rank r, fewer when a wider slot elsewhere set r.

        The weights scale the rank-m·r intermediate, not B: that is T·m·r numbers per row rather
        than m·r·d_out, and each factor is one gather. (Scaling B and building both layouts up
        front spent ~0.5 s of a 6.9 s prefill of 16 rows x 3 adapters copying, torch.profiler.)"""
        cache = self._cache
        if cache is None or cache[0] is not mix:
            idx = mix.indices.to(device).long()  # (B, m)
            coef = mix.weights.to(device=device, dtype=self.lora_A.dtype) * self.scaling[idx]  # (B, m)
            if idx.shape[0] > 1 and mix.rows_alike:
                idx, coef = idx[:1], coef[:1]  # every row mixes the same way: one shared pair of factors
            Bsz, m = idx.shape
            r = self.max_rank
            # On the host: each selected slot's real rank columns, where its weight is not 0
            # (FusedModel.sequence_mixture pads shorter rows with zero-weight entries, which need no
            # columns), real ones first in each row, up to the widest row's count. Only those rows of
            # the factors are gathered: the stack is padded to its widest slot, and gathering whole
            # padded slots per row cost more than the forward once a rank-112 adapter was loaded.
            host = mix.indices.long().cpu()[:Bsz]
            real = ((torch.arange(r) < self.ranks[host][..., None])
                    & (mix.weights.cpu()[:Bsz] != 0)[..., None]).reshape(Bsz, m * r)
            counts = real.sum(1)
            width = int(counts.max()) if real.numel() else 0
            keep = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :width]  # (B', width)
            slot = host.repeat_interleave(r, dim=1).gather(1, keep)  # each kept column's slot ...
            col = keep % r  # ... and its column within the slot (r > 0: a rank-0 layer returned above)
            index = torch.stack([slot, col, real.gather(1, keep).long(), keep]).to(device)  # one copy
            slot, col, on, keep = index[0], index[1], index[2], index[3]
            A_cat = self.lora_A[slot, col]  # (B', width, d_in)
            Bt = self.lora_B[slot, :, col]  # (B', width, d_out)
            # a row's columns past its own count point at some slot's column with weight 0: exact
            coef = coef.repeat_interleave(r, dim=1).gather(1, keep) * on.to(coef.dtype)
            coef = coef[:, None, :]  # (B', 1, width)
            At = A_cat.transpose(1, 2)
            if Bsz == 1:
                groups = [(None, At[0], Bt[0], coef[0, 0])]
            else:
                groups = [(None, At, Bt, coef)]
                narrow = _split(counts, self._SPLIT_SAVES)
                if narrow is not None:  # (rows, width) of the narrow group; the rest keep `width`
                    lo, t = narrow
                    hi = (counts > t).nonzero()[:, 0]
                    lo_d, hi_d = lo.to(device), hi.to(device)
                    groups = [(lo_d, At[lo_d, :, :t], Bt[lo_d, :t], coef[lo_d, :, :t]),
                              (hi_d, At[hi_d], Bt[hi_d], coef[hi_d])]
            cache = self._cache = [mix, None, groups]
        if rows > self._MANY_ROWS:
            return cache[2]
        if cache[1] is None:
            cache[1] = [(g, At.contiguous(), Bt, coef) for g, At, Bt, coef in cache[2]]
        return cache[1]

    # Decode with many rows, each its own mixture: gathering gives every row its own copy of its m
    # adapters' factors, so a step reads B·m adapters (16 rows x 3 = 48 on the serving benchmark,
    # as many bytes as the base weights). The union path reads each adapter that any row selects
    # once, as one rank-U·r LoRA whose rank blocks each row weights with its own coefficients, at
    # the price of U/m times the LoRA FLOPs; with a few tokens per row the reads dominate. U is at
    # most K, so with 100 adapters loaded and rows mixing 3 of 14, a step still reads 14.
    # That trade pays where decode is bound by reads. On the 2-core CPU it is not: skinny fp32
    # GEMMs are bound by compute, and a batch-16 decode step of the default model with 16
    # different 3-of-14 mixtures ran at 0.62-0.64 of the base step's speed with the union and
    # 0.75-0.81 with the gathered bmm (prepacked base weights, measured 2026-11-24). So the union
    # is used off CPU only, where decode is expected to be bound by reads (not measured: no GPU).
    _FEW_TOKENS = 4
    _UNION_ON_CPU = False

    def _reads_fewer_union(self, x: torch.Tensor, mix: SequenceMixture) -> bool:
        if x.device.type == "cpu" and not self._UNION_ON_CPU:
            return False
        rows, m = mix.indices.shape
        tokens = 1 if x.dim() == 2 else x.shape[1]
        return rows > 1 and tokens <= self._FEW_TOKENS and rows * m > mix.union[0].numel()

    def _add_union_delta(self, y: torch.Tensor, x: torch.Tensor, mix: SequenceMixture) -> torch.Tensor:
        """y + Σ_u coef[b, u] · B_u (A_u x) over the union of selected slots, cached per mixture object."""
        if self._union is None or self._union[0] is not mix:
            host, inverse = mix.union
            slots, inverse = host.to(x.device), inverse.to(x.device)
            coef = self.scaling.new_zeros(inverse.shape[0], slots.numel()).scatter_add_(
                1, inverse, mix.weights.to(device=x.device, dtype=self.scaling.dtype)) * self.scaling[slots]  # (B, U)
            if slots.numel() == self.num_slots:  # every slot: the layout the dense path keeps
                At, Bt, owner = self._all_flat()
            else:
                At, Bt, owner = self._flat_factors(host.cpu())
            self._union = (mix, At, Bt, coef[:, None, owner])  # (B, 1, Σr): broadcasts over tokens
        _, At, Bt, coef = self._union
        if At.shape[1] == 0:  # none of the selected slots adapts this layer
            return y
        d_in, d_out = x.shape[-1], y.shape[-1]
        z = x.reshape(-1, d_in) @ At  # (B·T, Σr)
        zw = z.view(coef.shape[0], -1, z.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            z = (zw * coef).view(z.shape)
        else:
            zw.mul_(coef)  # decode: no autograd, weight the rank columns in place
        return torch.addmm(y.reshape(-1, d_out), z, Bt).view(y.shape)  # the second matmul accumulates into y

    def _folded_weight(self, mix: SequenceMixture, device: torch.device) -> torch.Tensor | None:
        """W0 + Σ w_i s_i B_i A_i for a mixture every row shares (None if rows differ); cached."""
        if self._folded is not None and self._folded[0] is mix:
            return self._folded[1]
        self._folded = None  # free the previous fold before making the next
        groups = self._gathered(mix, device)
        if len(groups) > 1 or groups[0][1].dim() != 2:
            return None
        _, At, Bt, coef = groups[0]
        weight = torch.addmm(self.base.weight, (Bt * coef[:, None]).T, At.T)  # (d_out, d_in)
        self._folded = (mix, weight)
        return weight

    def _add_sequence_delta(self, y: torch.Tensor, x: torch.Tensor, mix: SequenceMixture) -> torch.Tensor:
        """y + the per-row mixture's update, accumulated into y by the second matmul (no extra pass)."""
        groups = self._gathered(mix, x.device, rows=x.numel() // x.shape[-1])
        if len(groups) > 1:
            return self._add_grouped_delta(y, x, groups)
        _, At, Bt, coef = groups[0]
        # Without autograd the update accumulates into y, the base output made just for this
        # call: an out-of-place add copied y first (0.56 s of a 6.7 s 16 x 120 prefill).
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or coef.requires_grad)
        if At.dim() == 2:  # shared mixture: plain matmuls over all rows
            d_out = y.shape[-1]
            z = x.reshape(-1, x.shape[-1]).mm(At)
            if grad:
                return torch.addmm(y.view(-1, d_out), z * coef, Bt).view(y.shape)
            y.view(-1, d_out).addmm_(z.mul_(coef), Bt)
            return y
        x3, y3 = (x[:, None], y[:, None]) if x.dim() == 2 else (x, y)
        z = x3.bmm(At)  # (B, T, m·r)
        if grad:
            out = torch.baddbmm(y3, z * coef, Bt)
            return out[:, 0] if x.dim() == 2 else out  # (B, T, d_out)
        y3.baddbmm_(z.mul_(coef), Bt)
        return y

    def _add_grouped_delta(self, y: torch.Tensor, x: torch.Tensor, groups: list[tuple]) -> torch.Tensor:
        """y + each group's rows' update, computed at the group's own width."""
        x3, y3 = (x[:, None], y[:, None]) if x.dim() == 2 else (x, y)
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        out = y3
        for rows, At, Bt, coef in groups:
            delta = (x3.index_select(0, rows).bmm(At) * coef).bmm(Bt)  # (B_g, T, d_out)
            out = out.index_add(0, rows, delta) if grad else out.index_add_(0, rows, delta)
        return out[:, 0] if x.dim() == 2 else out

    def extra_repr(self) -> str:
        return f"name={self.name}, slots={self.num_slots}, max_rank={self.max_rank}"
