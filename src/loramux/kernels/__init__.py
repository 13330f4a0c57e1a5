"""C++ kernels that PyTorch lacks on this class of CPU, built on first use.

`int8_linear` (int8_linear.cpp) is weight-only int8 matrix-vector work for decode on AVX2 CPUs,
where PyTorch's own int8/int4 weight-only kernels are slower than fp32
(`benchmarks/results/int8_linear.json`); `quantize_rows` rounds rows to int8 as the w8a8 base does, and
`w8a8_linear` is that base's product for up to 4 rows (decode: eager, and inside the compiled step,
engine/graph.py), `w8a8_linears` the same for several weights that read one input in one call.
`decode_attention` (decode_attention.cpp) is the compiled step's attention of one query token per
row over its cache, one call a layer for fp32 rows. They are compiled once per machine with the C++ compiler
that TorchInductor needs anyway (`--compile`), and kept where PyTorch keeps built extensions
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), named by a digest of their sources,
the torch version and the CPU's instruction sets. The operators are registered as
`torch.ops.loramux.int8_linear`, `.quantize_rows`, `.w8a8_linear`, `.w8a8_linears` and
`.decode_attention`, each with a shape-only
implementation, so that `torch.compile` keeps each inside a compiled graph as one call.

Where they cannot be built (no compiler, say), `int8_linear_op()` and the other `*_op()`
functions return None with the reason in `build_error()`: `--quantize int8` is then
refused (quantize.py), w8a8's few rows take the padded integer GEMM eagerly and tensor ops in
the compiled step (exact, slower), and the compiled step's attention two batched matmuls.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from pathlib import Path

_SOURCE = Path(__file__).with_name("int8_linear.cpp")
_SOURCES = (_SOURCE, Path(__file__).with_name("decode_attention.cpp"))
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ninja_on_path() -> None:
    """torch builds extensions with ninja, found on PATH; the `ninja` wheel (a dependency) puts it
    in the environment's bin directory, which is not on PATH when that environment is not active."""
    import os
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _build() -> None:
    import torch
    from torch.utils import cpp_extension

    _ninja_on_path()
    sources = [p.read_text() for p in _SOURCES]
    # -march=native: the build is for this CPU, so the cache key names its instruction sets
    key = hashlib.sha256("|".join((*sources, torch.__version__, _cpu_flags())).encode()).hexdigest()[:12]
    name = f"loramux_int8_{key}"
    cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)

    @torch.library.register_fake("loramux::int8_linear")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("loramux::quantize_rows")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], 1)

    @torch.library.register_fake("loramux::w8a8_linear")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("loramux::w8a8_linears")
    def _(x, q, scale):
        return [x.new_empty(x.shape[0], w.shape[0]) for w in q]

    @torch.library.register_fake("loramux::decode_attention")
    def _(q, keys, values, positions):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def int8_linear_op():
    """The compiled `torch.ops.loramux.int8_linear`, built on first call; None if it cannot be."""
    with _lock:
        if "op" not in _state:
            try:
                _build()
                import torch

                _state["op"] = torch.ops.loramux.int8_linear
            except Exception as e:  # no compiler, no ninja, an unsupported platform: the reference path serves
                _state["op"], _state["error"] = None, f"{type(e).__name__}: {e}"
        return _state["op"]


def quantize_rows_op():
    """`torch.ops.loramux.quantize_rows` (int8_linear.cpp), built with the int8 kernel; None if it cannot be."""
    if int8_linear_op() is None:
        return None
    import torch

    return torch.ops.loramux.quantize_rows


def w8a8_linear_op():
    """`torch.ops.loramux.w8a8_linear` (int8_linear.cpp): the w8a8 base's product for up to 4 rows,
    rounding them itself; None if the kernels cannot be built."""
    if int8_linear_op() is None:
        return None
    import torch

    return torch.ops.loramux.w8a8_linear


def w8a8_linears_op():
    """`torch.ops.loramux.w8a8_linears`: `w8a8_linear` over several weights that read the same rows,
    in one call; None if the kernels cannot be built."""
    if int8_linear_op() is None:
        return None
    import torch

    return torch.ops.loramux.w8a8_linears


def decode_attention_op():
    """`torch.ops.loramux.decode_attention` (decode_attention.cpp); None if the kernels cannot be built."""
    if int8_linear_op() is None:
        return None
    import torch

    return torch.ops.loramux.decode_attention


def build_error() -> str | None:
    """Why `int8_linear_op()` returned None (None when it built, or was not tried)."""
    return _state.get("error")
