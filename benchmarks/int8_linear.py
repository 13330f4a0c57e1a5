"""Weight-only int8 linears on this CPU: loramux's kernel next to fp32 and PyTorch's own kernels,
side by side in one process, on the default model's projection shapes. Writes
benchmarks/results/int8_linear.json.

    python benchmarks/int8_linear.py [--rows 1,2,4,8,16,32,64] [--repeats 50]

Per (shape, rows), the median microseconds of a call of (variants interleaved, as bench.speed does):
- fp32: `F.linear` on the fp32 weight; fp32_packed: the oneDNN-prepacked weight the server uses
  (cpu_linear.PackedLinear);
- int8_loramux: quantize.Int8Linear (its kernel up to KERNEL_ROWS rows, dequantise + GEMM above);
- int8_kernel: the kernel alone at every row count (where KERNEL_ROWS should sit);
- int8_dequant_gemm: dequantise then `F.linear` (the path above KERNEL_ROWS);
- torch_int8pack: `torch._weight_int8pack_mm` (what torchao's int8 weight-only runs on CPU);
- torch_int4pack: `torch._weight_int4pack_mm_for_cpu`, 4 bits in groups of 32.
The decode step reads every weight once, so rows 1-16 are decode and 32+ prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loramux.bench.machine import machine
from loramux.bench.speed import _median_times
from loramux.cpu_linear import PackedLinear, packing_available
from loramux.kernels import build_error, int8_linear_op
from loramux.quantize import KERNEL_ROWS, quantize_linears

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M: q/o, k/v, gate/up, down, the tied output head (out, in)
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}
FAST = ("fp32", "fp32_packed", "int8_kernel", "int8_loramux")


def int4_call(weight: torch.Tensor, group: int = 32):
    """torch's CPU int4 weight-only kernel on `weight`, asymmetric per group (as torchao packs it)."""
    out_f, in_f = weight.shape
    g = weight.view(out_f, in_f // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-6)
    q = torch.clamp(torch.round((g - low[..., None]) / scale[..., None]), 0, 15).to(torch.int32).view(out_f, in_f)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--output", default=str(RESULTS / "int8_linear.json"))
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    kernel = int8_linear_op()
    if kernel is None:
        sys.exit(f"the int8 kernel did not build: {build_error()}")
    result: dict = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (out_f, in_f) in SHAPES.items():
            linear = nn.Linear(in_f, out_f, bias=False)
            holder = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
            holder[0].weight.data.copy_(linear.weight)
            quantize_linears(holder)
            q = holder[0]
            packed = PackedLinear(linear, min_rows=1) if packing_available() else None
            int4 = int4_call(linear.weight)
            for m in rows:
                x = torch.randn(m, in_f)
                calls = {"fp32": lambda: F.linear(x, linear.weight), "int8_loramux": lambda: q(x),
                         "int8_kernel": lambda: kernel(x, q.weight, q.scale),
                         "int8_dequant_gemm": lambda: F.linear(x, q.dequantized()),
                         "torch_int8pack": lambda: torch._weight_int8pack_mm(x, q.weight, q.scale),
                         "torch_int4pack": lambda: int4(x)}
                if packed is not None:
                    calls["fp32_packed"] = lambda: packed(x)
                # the slow kernels get fewer repeats on the head (seconds per call otherwise)
                slow = {k: f for k, f in calls.items() if name == "lm_head" and k not in FAST}
                fast = {k: f for k, f in calls.items() if k not in slow}
                seconds = _median_times(fast, args.repeats, warmup=3) | (_median_times(slow, 5) if slow else {})
                cell = {k: round(seconds[k] * 1e6, 1) for k in calls}
                best_fp32 = min(cell["fp32"], cell.get("fp32_packed", cell["fp32"]))
                cell["int8_loramux_speedup_vs_best_fp32"] = round(best_fp32 / cell["int8_loramux"], 2)
                result.setdefault(name, {})[str(m)] = cell
                print(f"[int8_linear] {name} {out_f}x{in_f} rows={m}: {cell}", flush=True)
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "kernel_rows": KERNEL_ROWS, "unit": "microseconds per call (median)", "shapes": SHAPES, "results": result}
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
