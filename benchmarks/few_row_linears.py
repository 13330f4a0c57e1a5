"""A decode step's quantized linears for one to four rows: the C++ kernels next to the generated
reductions the compiled step used before, side by side in one process. Writes
benchmarks/results/few_row_linears.json.

    python benchmarks/few_row_linears.py [--rows 1,4] [--rounds 6] [--repeats 10]

The workload is one step's worth of the default model's linears (SmolLM2-135M: 30 blocks of 7
projections and the output head, 211 weights, 134 MB of int8), each a different weight as in a
real step, so every weight comes from memory rather than from cache; the repeated single-weight
timings of int8_linear.py measure the kernel on a weight already in cache. Per precision and row
count:
- `kernel`: the operator calls, as the compiled step makes them (`loramux::w8a8_linear` for w8a8,
  `loramux::int8_linear` for int8);
- `generated`: the same products as one torch.compile'd function of Inductor's generated
  reductions: for w8a8, DecodeGraph's form where the kernels cannot be built (rows rounded once,
  int8 products summed in fp32 chunks, then int32); for int8, the multiply and sum over the weight
  converted as it is read, then the scales (the compiled step's form before the kernels prefetched).
Rounds alternate the two; each round is the median of --repeats passes over all 211 weights.
The ratio is generated / kernel (above 1: the kernel is faster). A whole step also has attention,
norms and the framework around it: step_profile.py and vs_llamacpp.py measure those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from loramux.bench.machine import machine
from loramux.quantize import _KERNEL, Int8Linear, quantize_linears

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M's projections per block (out, in), and the output head
BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS, HEAD = 30, (49152, 576)


def linears(mode: str) -> nn.ModuleList:
    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(k, n, bias=False) for n, k in BLOCK * LAYERS + [HEAD]])
    quantize_linears(mods, mode)
    return mods


def generated_int8(x: torch.Tensor, m: Int8Linear) -> torch.Tensor:
    return (x[:, None, :] * m.weight.to(x.dtype)).sum(-1) * m.scale


def passes(fn, inputs: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(mode: str, rows: int, rounds: int, repeats: int) -> dict:
    from loramux.engine.graph import DecodeGraph

    mods = linears(mode)
    inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
    if mode == "w8a8":
        op = _KERNEL["w8a8"]
        graph = DecodeGraph.__new__(DecodeGraph)
        nn.Module.__init__(graph)
        graph.gemv_rows, graph.w8a8 = 4, True

        def kernel(xs):
            return [op(xs[m.in_features], m.weight, m.scale) for m in mods]

        def plain(xs):
            return [graph._apply(xs[m.in_features], m) for m in mods]
    else:
        op = _KERNEL["op"]

        def kernel(xs):
            return [op(xs[m.in_features], m.weight, m.scale) for m in mods]

        def plain(xs):
            return [generated_int8(xs[m.in_features], m) for m in mods]

    saved = _KERNEL["w8a8"]
    _KERNEL["w8a8"] = None  # traced without the kernel: the generated form
    try:
        torch._dynamo.reset()
        generated = torch.compile(plain, fullgraph=True)
        started = time.perf_counter()
        got = generated(inputs)
        compile_s = time.perf_counter() - started
    finally:
        _KERNEL["w8a8"] = saved
    want = kernel(inputs)
    if mode == "w8a8":  # both exact integer sums: equal bit for bit
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "w8a8: the two forms differ"
    else:
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(got, want)), "int8: the forms differ"
    result = {"kernel_ms": [], "generated_ms": []}
    for r in range(rounds):
        order = (("kernel", kernel), ("generated", generated))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            result[f"{name}_ms"].append(round(passes(fn, inputs, repeats), 3))
    result["ratio_generated_over_kernel"] = round(statistics.median(result["generated_ms"])
                                                  / statistics.median(result["kernel_ms"]), 3)
    result["compile_seconds"] = round(compile_s, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--precisions", default="w8a8,int8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--output", default=str(RESULTS / "few_row_linears.json"))
    args = ap.parse_args()
    out = {"command": "python benchmarks/few_row_linears.py " + " ".join(sys.argv[1:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "weights": f"{len(BLOCK) * LAYERS + 1} linears, SmolLM2-135M's shapes, random int8 values",
           "how": __doc__.split("\n\n")[1].strip(), "results": {}}
    for mode in args.precisions.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            res = measure(mode, rows, args.rounds, args.repeats)
            out["results"][f"{mode}_rows{rows}"] = res
            print(f"[few_row_linears] {mode} rows={rows}: {res}", flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
