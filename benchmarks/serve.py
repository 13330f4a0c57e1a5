"""Serving benchmark (issue 10): real HTTP through the `openai` client against `loramux serve`.

Prompts come from the shared tasks; every request asks for exactly --tokens new tokens
(`ignore_eos`). In one run: sequential requests, each with its own 3-adapter mixture; 16
concurrent clients on the base model; 16 concurrent, each with a different 3-of-K mixture; and
the same with --extra random adapters loaded beside the library (K + extra in memory). Streaming
gives time to first token and per output token on the client side.

    python benchmarks/serve.py --data-dir ../shared/data/bigbench [--tokens 64] [--extra 86]

Writes benchmarks/results/serve.json with `ratios`: concurrent16_vs_sequential,
mixed_vs_base_concurrent16, library100_vs_14.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from loramux import Library, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.bench.speed import random_adapter
from loramux.engine import Engine
from loramux.server import ServerConfig, create_app

RESULTS = Path(__file__).parent / "results"


def start(engine, lib):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, lib, ServerConfig(max_batch=16, max_queue=256)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def one(client, prompt: str, mix: dict | None, tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    extra = {"loramux": {"ignore_eos": True, **({"mix": mix} if mix else {})}}
    for chunk in client.completions.create(model="base", prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True, extra_body=extra):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            n += 1  # a chunk per decoded piece; the token count comes from `tokens` (ignore_eos)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tpot": (end - (first or end)) / max(1, tokens - 1), "seconds": end - t0}


def scenario(url: str, prompts: list[str], mixes: list, tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda i: one(client, prompts[i], mixes[i], tokens), range(len(prompts))))
    wall = time.perf_counter() - t0

    def pct(key, q):
        values = sorted(r[key] for r in runs)
        return values[min(len(values) - 1, int(q * len(values)))]
    return {"requests": len(runs), "concurrency": concurrency, "wall_seconds": round(wall, 2),
            "tokens_per_s": round(len(runs) * tokens / wall, 3),
            "ttft_p50": round(pct("ttft", 0.5), 3), "ttft_p99": round(pct("ttft", 0.99), 3),
            "tpot_p50": round(pct("tpot", 0.5), 4), "tpot_p99": round(pct("tpot", 0.99), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--extra", type=int, default=86, help="random r=8 adapters added for the 100-adapter run")
    ap.add_argument("--sequential", type=int, default=8, help="requests in the sequential run")
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
    server, url = start(engine, lib)
    mix3 = lambda: dict(zip(rng.sample(names, min(3, len(names))), (0.5, 0.3, 0.2)))  # noqa: E731
    seq_prompts = [rng.choice(pool) for _ in range(args.sequential)]
    conc_prompts = [rng.choice(pool) for _ in range(16)]
    results = {
        "sequential_mixed": scenario(url, seq_prompts, [mix3() for _ in seq_prompts], args.tokens, 1),
        "concurrent16_base": scenario(url, conc_prompts, [None] * 16, args.tokens, 16),
        "concurrent16_mixed": scenario(url, conc_prompts, [mix3() for _ in range(16)], args.tokens, 16),
    }
    for i in range(args.extra):  # more adapters in memory: does serving slow down?
        engine.fused.add_adapter(f"extra{i}", random_adapter(base, 8, seed=10_000 + i))
    results[f"concurrent16_mixed_{len(engine.adapters)}_adapters"] = scenario(
        url, conc_prompts, [mix3() for _ in range(16)], args.tokens, 16)
    server.should_exit = True
    big = results[f"concurrent16_mixed_{len(engine.adapters)}_adapters"]
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "adapters": len(names), "tokens": args.tokens, "results": results,
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
