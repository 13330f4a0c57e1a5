"""Serving benchmark (issue 10): real HTTP through the `openai` client against `loramux serve`.

Prompts come from the shared tasks; every request asks for exactly --tokens new tokens
(`ignore_eos`). In one run: sequential requests, each with its own 3-adapter mixture; 16
concurrent clients on the base model; 16 concurrent, each with a different 3-of-K mixture; and
the same with --extra random adapters loaded beside the library (K + extra in memory). Streaming
gives time to first token and per output token on the client side. The four scenarios run in
turn, --rounds times (the extra adapters are added for their scenario and removed after it), and
each scenario reports its median round: on this shared machine one scenario's throughput has
moved by 30% between runs minutes apart, which one pass per scenario turns into ratio noise.

    python benchmarks/serve.py --data-dir ../shared/data/bigbench [--tokens 64] [--extra 86] [--rounds 3]

Writes benchmarks/results/serve.json with `ratios`: concurrent16_vs_sequential,
mixed_vs_base_concurrent16, library100_vs_14.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import Library, load_base, load_tasks
from loramux.bench.load import scenario
from loramux.bench.machine import machine
from loramux.bench.speed import decode_step_profile, gemm_row_scaling, random_adapter
from loramux.cpu_linear import PackedLinear, unpack_linears
from loramux.engine import Engine
from loramux.server import ServerConfig, create_app
from loramux.server.background import serve_in_background

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--extra", type=int, default=86, help="random r=8 adapters added for the 100-adapter run")
    ap.add_argument("--sequential", type=int, default=8, help="requests in the sequential run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-pack", action="store_true", help="serve from plain (not oneDNN-prepacked) base weights")
    ap.add_argument("--output", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path

    rng = random.Random(0)
    base = load_base(args.model) if args.model else load_base()
    lib = Library(args.library or default_library_path())
    names = lib.names()
    tasks = load_tasks(args.data_dir, sorted({t for s in lib.list() for t in s.tasks}), "test")
    pool = [ex.prompt for t in tasks for ex in t.examples[:4]]
    engine = Engine(base, lib)
    for n in names:
        engine.load(n)
    app = create_app(engine, lib, ServerConfig(max_batch=16, max_queue=256, pack_linears=not args.no_pack))
    packed = sum(isinstance(m, PackedLinear) for m in base.model.modules())
    server, _, root = serve_in_background(app)
    url = f"{root}/v1"
    mix3 = lambda: dict(zip(rng.sample(names, min(3, len(names))), (0.5, 0.3, 0.2)))  # noqa: E731
    seq_prompts = [rng.choice(pool) for _ in range(args.sequential)]
    conc_prompts = [rng.choice(pool) for _ in range(16)]
    seq_mixes, mixes = [mix3() for _ in seq_prompts], [mix3() for _ in range(16)]
    big_name = f"concurrent16_mixed_{len(names) + args.extra}_adapters"
    extras = [f"extra{i}" for i in range(args.extra)]
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, prompts, mixtures, concurrency in (("sequential_mixed", seq_prompts, seq_mixes, 1),
                                                     ("concurrent16_base", conc_prompts, [None] * 16, 16),
                                                     ("concurrent16_mixed", conc_prompts, mixes, 16),
                                                     (big_name, conc_prompts, mixes, 16)):
            if name == big_name:  # the same mixtures with more adapters in memory: does serving slow down?
                for i, extra in enumerate(extras):
                    engine.fused.add_adapter(extra, random_adapter(base, 8, seed=10_000 + i))
            rounds.setdefault(name, []).append(scenario(url, prompts, mixtures, args.tokens, concurrency))
            if name == big_name:
                for extra in extras:
                    engine.unload(extra)
    server.should_exit = True
    # What bounds the ratios: one decode step (no HTTP, no scheduler) at batch 1 and 16, base vs
    # the benchmark's 16 mixtures, under torch.profiler, median of three tries each; when the
    # server ran packed, the same steps again with the plain kernel, side by side.
    ids = torch.randint(100, base.model.config.vocab_size - 100, (16, 96), generator=torch.Generator().manual_seed(0))
    tries = {"b1_base": lambda: decode_step_profile(base, ids[:1]),
             "b16_base": lambda: decode_step_profile(base, ids),
             "b16_mixed": lambda: decode_step_profile(base, ids, fused=engine.fused, mix=engine.sequence_mixture(mixes))}
    profiles = {}
    for suffix in ("", "_unpacked") if packed else ("",):
        if suffix:
            unpack_linears(base.model)
        for name, fn in tries.items():
            runs = sorted((fn() for _ in range(3)), key=lambda r: r["step_ms_profiled"])
            profiles[name + suffix] = runs[1]
    results = {name: min(runs, key=lambda r: abs(r["tokens_per_s"] - statistics.median(x["tokens_per_s"] for x in runs)))
               | {"tokens_per_s_rounds": [r["tokens_per_s"] for r in runs]} for name, runs in rounds.items()}
    big = results[big_name]
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "packed_linears": packed, "adapters": len(names), "tokens": args.tokens, "rounds": args.rounds,
        "results": results, "decode_step_profile": profiles, "gemm_row_scaling": gemm_row_scaling(base),
        "ratios": {
            "concurrent16_vs_sequential": round(results["concurrent16_mixed"]["tokens_per_s"]
                                                / results["sequential_mixed"]["tokens_per_s"], 3),
            "mixed_vs_base_concurrent16": round(results["concurrent16_mixed"]["tokens_per_s"]
                                                / results["concurrent16_base"]["tokens_per_s"], 3),
            "library100_vs_14": round(big["tokens_per_s"] / results["concurrent16_mixed"]["tokens_per_s"], 3),
        },
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios"], indent=1))


if __name__ == "__main__":
    main()
