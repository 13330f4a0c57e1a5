"""A quantized base under full-precision adapters: int8 base linears (weight-only, or w8a8).

Decoding one token reads every base weight once, so on a CPU a batch-1 step costs about the
weights' bytes over the memory bandwidth; int8 weights are a quarter of fp32's. `quantize_linears`
replaces each linear of the decoder blocks and the output head by an `Int8Linear`: the weight
rounded per output channel (symmetric, scale = max|w| / 127, as torchao's int8 weight-only);
activations and the LoRA factors stay fp32. The fused layer adds each row's update on top of the
quantized base's output (fusion/layer.py), so an adapter is applied exactly as trained, over a
slightly different W0.

The fast path is the C++ kernel in kernels/ (up to `KERNEL_ROWS` rows: decode and short
prefills, eagerly and inside the compiled decode step, engine/graph.py); more rows (long prefills, or a decode batch wider than 64) dequantise to the input's
dtype and run one GEMM, where converting the weight is amortised over the rows. Quantizing
to int8 refuses a machine where the kernel cannot be built: dequantising at every call would be
slower than fp32 and save no memory. `Int8Linear.reference` is the readable
definition both are tested against (tests/test_quantize.py). The embedding table stays fp32: a
token reads one row of it.

`w8a8` (`W8A8Linear`) also rounds each row of activations to int8 at run time (symmetric, one
scale per row: torchao's `int8_dynamic_activation_int8_weight`; llama.cpp's q8_0 matmuls do the
same with a scale per 32 values) and multiplies integers with PyTorch's `_int_mm` (oneDNN's
s8s8s32 GEMM); up to `W8A8_KERNEL_ROWS` rows (decode) the C++ kernel `w8a8_linear` rounds them and
sums the same exact products in one pass over the weight. With a batch of rows a step is bound by multiply throughput, not by reading
weights; on CPUs with VNNI an integer dot-product instruction does four times the multiplies of an
fp32 FMA of the same width (a 16-row step's linears: benchmarks/results/step_profile_w8a8_rows16.json).
The integer sums are exact, so a row's result does not depend on its batch; quantizing checks
that on this CPU (`_int_mm_is_exact`: oneDNN's int8 GEMM can saturate on CPUs without VNNI) and
refuses w8a8 where it fails. The price is the activation rounding (benchmarks/quantize_accuracy.py).

4-bit is not offered: PyTorch's CPU int4 weight-only kernel (the only one) ran well below fp32 on
the AVX-512 (VNNI) CPU this project is measured on (benchmarks/results/int8_linear.json: 5x fp32's
time for one row of q_proj), so 4 bits would save memory but cost speed.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoramuxError
from .models import QUANTIZE_CHOICES

log = logging.getLogger("loramux.quantize")

# Rows up to which the kernel runs: it beat dequantise + GEMM at every measured count up to 64
# (benchmarks/results/int8_linear.json: dequantising allocates and converts the whole weight per call)
KERNEL_ROWS = 64


class Int8Linear(nn.Linear):
    """y = x · (q · diag(scale))ᵀ + bias, with q int8 (out, in) and one fp32 scale per output.

    It stays an `nn.Linear` (in/out features, bias), so the fused layer wraps it and the library's
    shape checks see the projection they know (as cpu_linear.PackedLinear). `weight` is the int8
    tensor: code that asks a base linear for its device or dtype gets an honest answer, and the
    fused layer's fold (a float weight plus BA) does not apply to it. `weight` and `scale` are
    frozen parameters rather than buffers: a compiled step checks a module's buffers as tensor
    inputs at every call (about 1.5 ms of an 11 ms one-row int8 step, against 0.2 ms for the fp32
    model's parameters; benchmarks/results/step_profile.json)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: the dequantised weight, one linear in fp32, rounded to x's dtype."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized(), bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        # the kernel has no backward: an input that needs a gradient (a LoRA trained over this base) takes
        # the differentiable dequantising path
        if (0 < rows <= KERNEL_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            op = _KERNEL["op"]  # looked up when quantizing (a plain read: torch.compile traces through it)
            if op is not None:
                y = op(x.reshape(rows, x.shape[-1]), self.weight, self.scale).view(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# oneDNN's integer GEMM takes a much slower path below this many rows on this CPU class: fewer rows
# are padded with zeros, whose products are not read (up to W8A8_KERNEL_ROWS rows take the kernel)
_INT_MM_MIN_ROWS = 4
# rows up to which the w8a8 product runs in the C++ kernel (kernels/int8_linear.cpp): one pass over
# the weight, prefetched, for decode's few rows, where a GEMM call is mostly overhead
W8A8_KERNEL_ROWS = 4  # the kernel's own limit (kernels/int8_linear.cpp)
# its int32 sums of K products of magnitude at most 127 * 128 are exact up to this K (the kernel checks it)
W8A8_KERNEL_MAX_K = 2**31 // (127 * 128)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x rounded to int8 with its own scale max|row| / 127 (symmetric): (q, scale (..., 1))."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8Linear(Int8Linear):
    """y = s_x · s_w · (q_x · q_wᵀ) + bias: int8 weights as Int8Linear, and each input row rounded
    to int8 with its own scale (`quantize_rows`) before an exact integer product."""

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: the rounded rows and the dequantised weight, one linear in fp32."""
        q, scale = quantize_rows(x.float())
        bias = None if self.bias is None else self.bias.float()
        return F.linear(q.float() * scale, self.dequantized(), bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # rounding has no gradient: the rounded input passes the gradient straight through
            # (a LoRA trained over this base still learns through it)
            q, scale = quantize_rows(x.float())
            xq = x + (q.float() * scale).to(x.dtype).sub(x).detach()
            return F.linear(xq, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        flat = x.float().reshape(rows, x.shape[-1])
        op = _KERNEL["w8a8"]
        if op is not None and 0 < rows <= W8A8_KERNEL_ROWS and self.in_features <= W8A8_KERNEL_MAX_K and x.device.type == "cpu":
            y = op(flat, self.weight, self.scale)  # the same rounding and exact sums, one pass
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        q, scale = quantize_rows(flat)
        if rows < _INT_MM_MIN_ROWS:
            q = F.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS - rows))
        acc = torch._int_mm(q, self.weight.t())[:rows]
        y = acc.float() * scale * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("int8", "w8a8")


# looked up when quantizing; plain reads at run time (torch.compile traces through them):
# "op" the int8 kernel, "w8a8" the w8a8 product for up to W8A8_KERNEL_ROWS rows ("w8a8s" the same over
# several weights that read one input), "quantize_rows" the row rounding the compiled step's few w8a8
# rows use where "w8a8" is None (engine/graph.py)
_KERNEL: dict = {"op": None, "quantize_rows": None, "w8a8": None, "w8a8s": None}


def _load_kernel() -> None:
    from .kernels import build_error, int8_linear_op

    if _KERNEL["op"] is None:
        _KERNEL["op"] = int8_linear_op()
        if _KERNEL["op"] is None:  # dequantising every call would be slower than fp32 and save no memory
            raise LoramuxError(f"--quantize int8 needs its CPU kernel, which could not be built here: {build_error()} "
                               "(it needs a C++ compiler, as torch.compile does)")


def _int_mm_is_exact() -> bool:
    """torch._int_mm on inputs at ±127 (where an int16 intermediate would saturate) against int64
    sums, at a one-row-padded and a many-row shape."""
    g = torch.Generator().manual_seed(0)
    for rows in (_INT_MM_MIN_ROWS, 33):
        a = torch.where(torch.rand(rows, 256, generator=g) < 0.5, 127, -127).to(torch.int8)
        b = torch.where(torch.rand(48, 256, generator=g) < 0.5, 127, -127).to(torch.int8)
        a[0], b[0] = 127, 127  # one sum of 256 · 127²
        if not torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().t()):
            return False
    return True


def quantize_linears(model: nn.Module, mode: str = "int8") -> int:
    """Replace the decoder's linears and the output head by `Int8Linear`s (`W8A8Linear`s for
    "w8a8") in place; returns how many. The embedding stays fp32 (tied to the head in many small models: the head gets its own
    int8 copy). Call on a plain model, before fusing adapters or packing weights."""
    if mode == "none":
        return 0
    if mode not in ("int8", "w8a8"):
        raise LoramuxError(f"quantize: {mode!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    other = {str(m.weight.dtype) for m in linears if m.weight.dtype != torch.float32}
    if other:  # checked before any change: a refused model is left as it was
        raise LoramuxError(f"quantize {mode} takes an fp32 base (got {', '.join(sorted(other))}); load it with dtype float32")
    if sum(1 for m in linears if m is not getattr(model, "lm_head", None)) == 0:
        raise LoramuxError(f"quantize {mode}: this model's projections are not nn.Linear modules; only those are quantized")
    if mode == "int8" and any(m.weight.device.type == "cpu" for m in linears):
        _load_kernel()
    if mode == "w8a8":
        if any(m.weight.device.type != "cpu" for m in linears):
            raise LoramuxError("quantize w8a8 is a CPU option (torch._int_mm's CPU GEMM); load the base on the CPU")
        if not _int_mm_is_exact():
            raise LoramuxError("quantize w8a8: this CPU's integer GEMM (oneDNN) does not return exact sums for "
                               "int8 inputs at the extremes; use --quantize int8")
        if _KERNEL["quantize_rows"] is None or _KERNEL["w8a8"] is None or _KERNEL["w8a8s"] is None:
            # optional: without them, few rows take the padded integer GEMM eagerly and tensor ops in
            # the compiled step (the same values, slower)
            from .kernels import quantize_rows_op, w8a8_linear_op, w8a8_linears_op

            _KERNEL["quantize_rows"] = quantize_rows_op()
            _KERNEL["w8a8"] = w8a8_linear_op()
            _KERNEL["w8a8s"] = w8a8_linears_op() if _KERNEL["w8a8"] is not None else None
            if _KERNEL["w8a8"] is None:
                from .kernels import build_error

                log.warning("w8a8: the few-row operators could not be built (%s); decode's few rows take the padded "
                            "integer GEMM instead, and tensor ops in the compiled step: the same results, slower",
                            build_error())
    kind = Int8Linear if mode == "int8" else W8A8Linear
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, kind(child))
                count += 1
    return count
