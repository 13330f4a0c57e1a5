"""Inference linears with oneDNN-prepacked weights, for serving on CPU.

`torch.nn.functional.linear` on CPU re-lays out the weight for its GEMM kernel on every call.
With a few rows (batched decode) that work is not amortised: on the 2-core EPYC these machines
have (fp32, torch 2.13), one 576x1536 projection took 1,035 us for 16 rows against 102 us for
one, i.e. batching 16 requests bought only 1.6x. oneDNN can lay the weight out once
(`torch.ops.mkldnn._reorder_linear_weight`, what TorchInductor's CPU freezing pass emits); the
same projection then takes 605 us for 16 rows (1.7x), the 576x49152 LM head 1.5-3.8x faster at
1-16 rows, a 768-row prefill 1.16x. With one or two rows the plain kernel is faster on the
smaller projections, so `PackedLinear` picks per call by the number of rows
(`benchmarks/results/serve.json`, "packed_linear", holds the measurement).

Packing is for inference only: a call with autograd recording falls back to `F.linear`, and a
weight changed in place since it was packed is packed again (its version counter is checked).
The packed copy costs one extra copy of each packed weight in memory.

A compiled graph cannot hold oneDNN's packed tensor (it is opaque to torch.compile's tracing), so
`packed_linear` (the custom op `loramux::packed_linear`) takes the plain weight and finds the
PackedLinear that owns it: the compiled decode step (`engine/graph.py`) calls it for batches of
rows where the packed kernel wins, instead of re-laying out every weight at every step.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Linear):
    """An nn.Linear sharing the original's parameters plus a prepacked copy of its weight.

    It stays an `nn.Linear` (same weight, bias, in/out features), so code that reads those
    attributes, the fused layer's fold and PEFT's wrappers included, sees no difference."""

    def __init__(self, linear: nn.Linear, min_rows: int | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        # Rows from which the packed kernel won, measured per projection size (module docstring).
        numel = self.weight.numel()
        self.min_rows = min_rows or (1 if numel >= 4_000_000 else 2 if numel >= 500_000 else 8)
        self._packed: tuple[int, torch.Tensor] | None = None
        _OWNERS[_key(self.weight)] = self

    def _packed_weight(self) -> torch.Tensor:
        version = self.weight._version
        if self._packed is None or self._packed[0] != version:
            with torch.no_grad():
                self._packed = (version, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows < self.min_rows or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's memory as one matrix: a transposed view of a square weight has
    the same address and shape, not the same strides."""
    return weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype


# weight -> the PackedLinear holding it; weak, so unpacking or dropping a model frees the entry, and
# an address used again by another tensor is checked against the owner's weight before use
_OWNERS: "weakref.WeakValueDictionary[tuple, PackedLinear]" = weakref.WeakValueDictionary()


# Defined on the dispatcher directly rather than with `torch.library.custom_op`: a compiled 16-row
# step makes 211 of these calls, and custom_op's Python wrapper (its autograd and checks layers)
# cost more per call than the remaining Python of the kernel below (benchmarks/compiled_decode.py
# times the step). Inference only: no autograd kernel is registered (graph.py calls it under no_grad).
_LIB = torch.library.Library("loramux", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the packed copy of the PackedLinear that owns `weight`;
    plain `F.linear` for a weight no PackedLinear holds (`torch.ops.loramux.packed_linear`)."""
    owner = _OWNERS.get(_key(weight))
    if owner is None or _key(owner.weight) != _key(weight):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, owner._packed_weight(), bias, "none", [], "")


_LIB.impl("packed_linear", packed_linear, "CPU")


@torch.library.register_fake("loramux::packed_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def pack_linears(model: nn.Module, min_rows: int | None = None) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear` (in place); returns how
    many were replaced. A no-op (0) where oneDNN is unavailable. `min_rows` overrides the measured
    row thresholds (tests use 1 to exercise the packed kernel on tiny models). Tied weights stay tied: the
    modules share the Parameter, each keeps its own packed copy."""
    if not packing_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32):
                setattr(parent, name, PackedLinear(child, min_rows))
                count += 1
    return count


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: plain `nn.Linear`s sharing the same parameters; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.unpacked())
                count += 1
    return count
