"""What bounds 16 concurrent requests on the compiled server path: prefill vs decode time.

vs_llamacpp.py's `concurrent16_base` row is 16 HTTP clients sending 2 requests each. This runs
the same pattern without HTTP, on the scheduler thread as `loramux serve --compile` sets it up
(model built on a thread that ends, linears packed, every slot count warmed up), with short and
long prompts, and both arrival patterns: all 32 requests queued at once, and 16 client threads
each sending its second request when its first returns. It times the scheduler's own prefills
and decode steps, so a row reports where its wall time went.

    python benchmarks/batch_bound.py [--library DIR] [--tokens 64] [--quantize int8]

Any library works (the rows are base-model requests); vs_llamacpp.py's stand-ins do
(`--library ~/.cache/loramux-bench/stand-ins-14`). Writes benchmarks/results/batch_bound.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SENTENCES = ["Explain why the sky is blue.", "Write a short poem about the sea.", "List three uses of a brick.",
             "What is 17 times 23?", "Summarise the plot of a detective story.", "Translate 'good morning' to French."]


def main() -> None:
    from loramux import Library, load_base
    from loramux._home import default_library_path
    from loramux.bench.machine import machine
    from loramux.cpu_linear import pack_linears
    from loramux.cpu_threads import on_passing_thread
    from loramux.engine import Engine, GenerationRequest, SamplingParams
    from loramux.engine.scheduler import Scheduler
    from loramux.models import QUANTIZE_CHOICES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    ap.add_argument("--prefix-cache-tokens", type=int, default=0,
                    help="the scheduler's prefix cache (serve's default is 4096; 0, the committed runs: off)")
    ap.add_argument("--output", default=str(RESULTS / "batch_bound.json"))
    args = ap.parse_args()

    def build() -> Engine:
        base = load_base(quantize=args.quantize)
        pack_linears(base.model)
        engine = Engine(base, Library(args.library or default_library_path()), compile=True)
        engine.compiled.warmup(16, lora=False)
        return engine

    engine = on_passing_thread(build)  # as `loramux serve` does (cpu_threads.py)
    sampling = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    sched = Scheduler(engine, max_batch=16, max_queue=64, prefix_cache_tokens=args.prefix_cache_tokens)
    spent = {"prefill": [], "decode": []}

    def timed(kind, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[kind].append(time.perf_counter() - started)
        return wrapper

    sched._prefill = timed("prefill", sched._prefill)
    sched._decode = timed("decode", sched._decode)
    sched.start()

    def all_at_once(prompts):
        futures = [sched.submit(GenerationRequest(p, None, sampling)) for p in prompts]
        for f in futures:
            f.result()

    def clients(prompts):
        def client(c):
            for k in range(2):
                sched.submit(GenerationRequest(prompts[2 * c + k], None, sampling)).result()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    rows = {}
    for length, repeat in (("short", 1), ("long", 3)):
        prompts = [" ".join(SENTENCES * repeat) if repeat > 1 else SENTENCES[i % len(SENTENCES)] for i in range(32)]
        prompts = [f"{p} (case {i})" for i, p in enumerate(prompts)]  # no two alike
        all_at_once(prompts[:16])  # warm-up at this length (the cache view's length differs)
        for pattern, fn in (("all_at_once", all_at_once), ("clients", clients)):
            for v in spent.values():
                v.clear()
            steps0 = dict(sched.stats)
            started = time.perf_counter()
            fn(prompts)
            wall = time.perf_counter() - started
            steps = sched.stats["steps"] - steps0["steps"]
            rows[f"{length}_{pattern}"] = {
                # as prefilled: the request's chat template applied (GenerationRequest's default)
                "prompt_tokens_mean": round(sum(len(engine.formatter.encode_prompt(p)) for p in prompts) / len(prompts), 1),
                "tokens_per_s": round(32 * args.tokens / wall, 1), "wall_s": round(wall, 2),
                "prefill_s": round(sum(spent["prefill"]), 2), "prefills": len(spent["prefill"]),
                "decode_s": round(sum(spent["decode"]), 2), "decode_steps": steps,
                "decode_ms_per_step": round(1000 * sum(spent["decode"]) / max(len(spent["decode"]), 1), 1),
                "mean_rows_per_step": round((sched.stats["batch_rows"] - steps0["batch_rows"]) / max(steps, 1), 1)}
            print(f"[batch_bound] {length}_{pattern}: {rows[f'{length}_{pattern}']}", file=sys.stderr, flush=True)
    sched.stop()
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "quantize": args.quantize, "tokens": args.tokens, "requests": 32, "max_batch": 16,
        "how": "the scheduler thread of `loramux serve --compile` without HTTP; prefill_s and decode_s are the "
               "scheduler's own prefill and decode calls (the rest of wall_s: sampling, retiring, waiting for "
               "arrivals); one run per row, after a warm-up at the same prompt length",
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
