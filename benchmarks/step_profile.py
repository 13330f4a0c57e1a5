"""Where decode time goes on the compiled path: the step alone, and the scheduler.

For each precision (fp32 with the server's packed linears, and `--quantize int8`), the model is
built as `loramux serve --compile` builds it (on a thread that ends, then the scheduler's thread
steps it), the step for --rows rows is warmed up, and then:
  - `scheduler_ms_per_token`: --rows 64-token base requests at a time through the scheduler, time
    per token of a row after its first (sampling, retiring and the scheduler's own work included),
    5 times;
  - `step_ms`: `Slots.step` alone over --rows rows on the scheduler thread, 60 steps at a time, 3 times;
  - `compile_seconds`: the first call of each step shape (a cold compile, or a load from
    Inductor's on-disk cache);
  - `profile`: torch.profiler over 20 steps, the operators with the most self time per step
    (the generated program's calls, library calls it makes, Dynamo's cache lookup).

    python benchmarks/step_profile.py [--precisions none,int8] [--rows 1] [--adapters 0]

A precision written `<precision>/plain` (e.g. `w8a8/plain`) runs without the few-row step's block
kernels (the attention as two batched matmuls per layer, a w8a8 block's q, k, v and gate, up one
kernel call each), and `<precision>/attention<N>` with the attention operator up to N rows (graph.py's
ATTENTION_KERNEL_ROWS), for an A/B in one run; a precision named twice is measured twice (`#2`).

The model alone by default (no adapters: a base row's step runs the graph without LoRA). With
`--adapters K`, K random r=8 adapters are loaded (as `vs_llamacpp.py --stand-ins K` serves them)
and each row gets its own 3-adapter mixture (weights 0.5, 0.3, 0.2, as that benchmark's
`concurrent16_distinct` row): `step_ms` and `profile` are then the mixed step's, and
`base_step_ms` and `base_profile` the same rows' without mixtures, measured in the same process. Writes
benchmarks/results/step_profile.json (--rows 1), step_profile_rows<N>.json, or
step_profile_rows<N>_adapters<K>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain why the sky is blue."


def child(quantize: str, rows: int, adapters: int, variant: str = "") -> dict:
    import random

    import torch
    from transformers import DynamicCache

    from loramux import load_base
    from loramux.cpu_linear import pack_linears
    from loramux.cpu_threads import on_passing_thread
    from loramux.engine import Engine, GenerationRequest, SamplingParams
    from loramux.bench.speed import random_adapter
    from loramux.engine.scheduler import Scheduler

    def build() -> Engine:
        base = load_base(quantize=quantize)
        from loramux.engine import graph

        if variant == "plain":  # the step as before its block kernels: attention as batched matmuls, a call per projection
            from loramux.quantize import _KERNEL

            graph._load_ops()
            graph._OPS["attention"] = _KERNEL["w8a8s"] = None
        elif variant.startswith("attention"):  # the attention operator up to this many rows
            graph.ATTENTION_KERNEL_ROWS = int(variant.removeprefix("attention"))
        engine = Engine(base, None, compile=True)
        for i in range(adapters):  # before packing, as the server loads its library before serving
            engine.fused.add_adapter(f"standin{i:02d}", random_adapter(base, 8, 2000 + i))
        pack_linears(engine.fused.base.model)  # as the server does (a no-op for int8 linears)
        engine.compiled.warmup(rows, lora=adapters > 0)
        return engine

    engine = on_passing_thread(build)
    sched = Scheduler(engine, max_batch=rows, max_queue=rows)
    sched.start()
    sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)

    def one() -> float:
        started = time.perf_counter()
        futures = [sched.submit(GenerationRequest(f"{PROMPT} ({i})", None, sampling)) for i in range(rows)]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - started
        return 1000 * (wall - max(r.seconds_to_first_token for r in results)) / (len(results[0].token_ids) - 1)

    one()
    per_token = [round(one(), 2) for _ in range(5)]

    names = list(engine.fused.adapters)
    rng = random.Random(0)
    mixtures = [dict(zip(rng.sample(names, 3), (0.5, 0.3, 0.2))) if names else None for _ in range(rows)]

    def steps(mixed: list) -> tuple[list[float], list[dict]]:
        g = engine.compiled.graph
        slots = engine.compiled.slots()
        kv = [torch.zeros(1, g.n_kv, 20, g.head_dim) for _ in g.layers]
        for m in mixed:
            slots.admit(DynamicCache([(k, k.clone()) for k in kv]), torch.ones(1, 20, dtype=torch.long), [m])
        every = list(range(rows))
        slots.step(every, [5] * rows)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(60):
                slots.step(every, [5] * rows)
            times.append(round(1000 * (time.perf_counter() - started) / 60, 2))
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(20):
                slots.step(every, [5] * rows)
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        return times, [{"op": e.key[:60], "self_ms_per_step": round(e.self_cpu_time_total / 1000 / 20, 3),
                        "calls_per_step": e.count / 20} for e in top]

    result = {"scheduler_ms_per_token": per_token}
    if adapters:
        result["base_step_ms"], result["base_profile"] = sched.call(lambda: steps([None] * rows)).result()
        result["mixtures"] = mixtures
    times, top = sched.call(lambda: steps(mixtures)).result()
    sched.stop()
    return result | {"step_ms": times, "profile": top, "compile_seconds": engine.compiled.compile_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="none,int8")
    ap.add_argument("--rows", type=int, default=1, help="rows decoding together")
    ap.add_argument("--adapters", type=int, default=0, help="random r=8 adapters; each row mixes 3 of them")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=None, help="default: results/step_profile.json, step_profile_rows<N>.json, or "
                                                       "step_profile_rows<N>_adapters<K>.json")
    args = ap.parse_args()
    if args.child:
        precision, _, variant = args.child.partition("/")
        print(json.dumps(child(precision, args.rows, args.adapters, variant)))
        return
    from loramux.bench.machine import machine

    rows = {}
    for q in args.precisions.split(","):  # each in its own process: one OpenMP team, one Dynamo cache
        out = subprocess.run([sys.executable, __file__, "--child", q, "--rows", str(args.rows),
                              "--adapters", str(args.adapters)], check=True,
                             capture_output=True, text=True)
        name, n = q.replace("none", "fp32"), 1
        while (name if n == 1 else f"{name}#{n}") in rows:
            n += 1
        name = name if n == 1 else f"{name}#{n}"
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[step_profile] {name}: {rows[name]}", file=sys.stderr, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "decode_rows": args.rows, "adapters": args.adapters, "rows": rows,
              "how": "rows on the compiled path (base rows, or each its own mixture with --adapters), model built as "
                     "`loramux serve --compile` builds it; profile "
                     "self times are under torch.profiler, which slows the step (compare its shares, not its sum, "
                     "with step_ms)"}
    name = "step_profile" + (f"_rows{args.rows}" if args.rows > 1 else "") + (f"_adapters{args.adapters}" if args.adapters else "")
    output = args.output or str(RESULTS / f"{name}.json")
    Path(output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
