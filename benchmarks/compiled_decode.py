"""Compiled decode vs eager decode, side by side in one process (issue 28, part 1).

Both paths run through the scheduler as the server does (no fold; both on oneDNN-prepacked
weights unless --no-pack: the eager path's linears, and the compiled step above 4 rows), on the
same prompts, greedy, every request asking for exactly --tokens new tokens. Rows: one request with the base model, one with a 3-adapter mixture,
--rows concurrent requests on the base model, and --rows requests each with its own 3-adapter
mixture. Each row alternates eager and compiled --rounds times and reports the median tokens/s
(generated tokens over wall time, prefill included) and their ratio. Compile time is what the
first call of each shape cost in this process: a cold compile if Inductor's cache
($TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) did not have it, else the load.

    python benchmarks/compiled_decode.py [--library DIR] [--tokens 64] [--rows 16] [--rounds 3]
        [--workloads sequential_base,sequential_mixed,concurrent16_base,concurrent16_distinct]
        [--quantize int8 --output benchmarks/results/compiled_decode_int8.json]

Writes benchmarks/results/compiled_decode.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import Library, load_base
from loramux.bench.machine import machine
from loramux.cpu_linear import pack_linears
from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.engine.compiled import CompiledDecoder
from loramux.engine.scheduler import Scheduler, generate_all
from loramux.models import QUANTIZE_CHOICES

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about the sea.", "List three uses of a brick.",
           "What is 17 times 23?", "Summarise the plot of a detective story.", "Translate 'good morning' to French."]


def run(engine: Engine, requests: list[GenerationRequest], rows: int) -> tuple[float, list[list[int]]]:
    sched = Scheduler(engine, max_batch=rows, max_queue=len(requests))
    started = time.perf_counter()
    results = generate_all(sched, requests)
    seconds = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results) / seconds, [r.token_ids for r in results]


def main() -> None:
    from loramux._home import default_library_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library (needs 3 adapters or more)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-pack", dest="pack", action="store_false")
    ap.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help="the base for both paths")
    ap.add_argument("--workloads", default=None, help="comma-separated subset of the rows (default: all four)")
    ap.add_argument("--output", default=str(RESULTS / "compiled_decode.json"))
    args = ap.parse_args()

    lib = Library(args.library or default_library_path())
    names = lib.names()
    if len(names) < 3:
        sys.exit(f"{lib.path} has {len(names)} adapters; this benchmark mixes 3")
    base = load_base(quantize=args.quantize)
    eager = Engine(base, lib)
    for n in names:
        eager.load(n)
    if args.pack:
        pack_linears(base.model)
    compiled = Engine(base, lib, fused=eager.fused)
    compiled.compiled = CompiledDecoder(eager.fused)
    rng = random.Random(0)
    mixes = [dict(zip(rng.sample(names, 3), (0.5, 0.3, 0.2))) for _ in range(args.rows)]
    sampling = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    workloads = {
        "sequential_base": ([GenerationRequest(PROMPTS[0], None, sampling)], 1),
        "sequential_mixed": ([GenerationRequest(PROMPTS[0], mixes[0], sampling)], 1),
        f"concurrent{args.rows}_base": ([GenerationRequest(PROMPTS[i % len(PROMPTS)], None, sampling)
                                         for i in range(args.rows)], args.rows),
        f"concurrent{args.rows}_distinct": ([GenerationRequest(PROMPTS[i % len(PROMPTS)], mixes[i], sampling)
                                             for i in range(args.rows)], args.rows),
    }
    if args.workloads:
        unknown = set(args.workloads.split(",")) - set(workloads)
        if unknown:
            ap.error(f"--workloads: unknown {sorted(unknown)}; accepted: {', '.join(workloads)}")
        workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    out_rows, agree = {}, {}
    for name, (requests, rows) in workloads.items():
        t0 = time.perf_counter()
        _, first = run(compiled, requests, rows)  # compiles (or loads) this shape
        print(f"[compiled_decode] {name}: first compiled run {time.perf_counter() - t0:.1f} s", flush=True)
        speeds = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for kind, engine in (("eager", eager), ("compiled", compiled)):
                tps, tokens = run(engine, requests, rows)
                speeds[kind].append(tps)
                if kind == "eager":
                    agree[name] = sum(a == b for a, b in zip(tokens, first)) / len(tokens)
        med = {k: round(statistics.median(v), 2) for k, v in speeds.items()}
        out_rows[name] = {"tokens_per_s": med, "all": {k: [round(x, 2) for x in v] for k, v in speeds.items()},
                          "ratio_compiled_vs_eager": round(med["compiled"] / med["eager"], 3)}
        print(f"[compiled_decode] {name}: {out_rows[name]}", flush=True)
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "library": str(lib.path), "adapters_loaded": len(names), "tokens": args.tokens, "rounds": args.rounds,
        "eager_packed_linears": args.pack, "quantize": args.quantize, "rows": out_rows,
        "ratios": {k: v["ratio_compiled_vs_eager"] for k, v in out_rows.items()},
        "greedy_tokens_equal_share": agree,
        "greedy_tokens_equal_how": "share of requests whose greedy tokens were identical on both paths (fp32: "
                                   "the compiled graph sums in another order, so a near-tie can flip)",
        "compile_seconds": compiled.compiled.compile_seconds,
        "compile_seconds_how": "first call of each shape in this process: a cold compile, or a load where "
                               "Inductor's on-disk cache already held it",
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios"], indent=1))


if __name__ == "__main__":
    main()
