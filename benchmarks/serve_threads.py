"""Where the server builds its model changes its decode speed: libgomp's spin throttling.

The scheduler decodes on its own thread. This runs the same requests through `Scheduler` three
ways, each in a fresh process (an OpenMP pool lives as long as its thread, so they cannot share
one): `main_thread` builds the engine and steps the scheduler synchronously on the main thread
(one OpenMP team); `built_on_main` builds on the main thread and decodes on the scheduler's thread,
as `loramux serve` did (two teams on a 2-core machine: libgomp throttles its spinning, see
src/loramux/cpu_threads.py); `built_on_passing_thread` builds on a thread that ends
(`cpu_threads.on_passing_thread`, what `loramux serve` does now) and decodes on the scheduler's
thread. Tokens/s are generated tokens over wall time, prefill included; each variant runs its
requests one at a time, after one warm-up request.

    python benchmarks/serve_threads.py [--library DIR] [--compile/--no-compile] [--requests 6] [--rounds 2]

Writes benchmarks/results/serve_threads.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("main_thread", "built_on_main", "built_on_passing_thread")
PROMPT = "Explain why the sky is blue."


def child(variant: str, library: str, compile: bool, requests: int) -> None:
    """One variant in this process; prints its tokens/s per request as JSON."""
    from loramux import Library, load_base
    from loramux.cpu_linear import pack_linears
    from loramux.cpu_threads import on_passing_thread
    from loramux.engine import Engine, GenerationRequest, SamplingParams
    from loramux.engine.scheduler import Scheduler, generate_all

    def build() -> Engine:
        lib = Library(library)
        engine = Engine(load_base(), lib, compile=compile)
        for name in lib.names():
            engine.load(name)
        pack_linears(engine.fused.base.model)  # as the server does (ServerConfig.pack_linears)
        if engine.compiled is not None:
            engine.compiled.warmup(1)
        return engine

    engine = on_passing_thread(build) if variant == "built_on_passing_thread" else build()
    sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
    sched = Scheduler(engine, max_batch=1, max_queue=4)
    threaded = variant != "main_thread"
    if threaded:
        sched.start()

    def one() -> float:
        request = GenerationRequest(PROMPT, None, sampling)
        started = time.perf_counter()
        result = sched.submit(request).result() if threaded else generate_all(sched, [request])[0]
        return len(result.token_ids) / (time.perf_counter() - started)

    one()  # warm-up
    print(json.dumps([round(one(), 2) for _ in range(requests)]))
    if threaded:
        sched.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, interleaved")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(RESULTS / "serve_threads.json"))
    args = ap.parse_args()
    if args.library is None:
        from loramux._home import default_library_path

        args.library = str(default_library_path())
    if args.child:
        child(args.child, args.library, args.compile, args.requests)
        return
    from loramux.bench.machine import machine

    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--library", args.library,
                   "--requests", str(args.requests), "--compile" if args.compile else "--no-compile"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[variant] += json.loads(out.strip().splitlines()[-1])
            print(f"[serve_threads] {variant}: {runs[variant][-args.requests:]}", file=sys.stderr, flush=True)
    median = {v: round(statistics.median(x), 2) for v, x in runs.items()}
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "compile": args.compile, "library": args.library,
              "tokens_per_s_median": median, "tokens_per_s_all": runs,
              "ratio_vs_main_thread": {v: round(median[v] / median["main_thread"], 3) for v in VARIANTS},
              "how": "one request of 64 greedy tokens at a time (prefill included), base model, each variant in "
                     "fresh processes interleaved round by round; see the module docstring"}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["tokens_per_s_median"], indent=1))


if __name__ == "__main__":
    main()
