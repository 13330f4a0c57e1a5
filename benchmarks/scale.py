"""What the Ray layer costs on one machine (issue 11), in one run.

Serving: `loramux serve` (its own process) against Ray Serve with one replica (same app, same
CPUs), both driven over HTTP by the `openai` client with the same requests: every request its
own 3-adapter mixture, --concurrency at a time, --tokens new tokens each. Training: --train-tasks
short adapters one after another in this process against `loramux train --ray` (one Ray task per
adapter, one CPU each), timed with Ray's start-up included and excluded.

    python benchmarks/scale.py --data-dir ../shared/data/bigbench [--library DIR]

Writes benchmarks/results/scale.json; `ratios`: ray_serve_vs_local_throughput,
ray_serve_vs_local_p50_latency, ray_train_vs_sequential_time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from loramux import Library, load_base, load_tasks
from loramux.bench.load import scenario, wait_ready
from loramux.bench.machine import machine
from loramux.server import ServerConfig
from loramux.server.background import free_port
from loramux.training import LoraTrainConfig, train_adapters

RESULTS = Path(__file__).parent / "results"


def serve_local(model: str, library: str, load: dict) -> dict:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "loramux"), "serve", "-l", library, "--model", model,
           "--port", str(port), "--max-batch", "16", "--max-queue", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        scenario(f"http://127.0.0.1:{port}/v1", **{**load, "prompts": load["prompts"][:2], "mixes": load["mixes"][:2]})
        return scenario(f"http://127.0.0.1:{port}/v1", **load)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def serve_ray(model: str, library: str, load: dict) -> dict:
    import ray
    from ray import serve

    from loramux.server import ray_serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.run(model, library, ServerConfig(max_batch=16, max_queue=256), port=port, blocking=False,
                      replicas=1, ray_actor_options={"num_cpus": 2})  # both cores, as the local server has
        wait_ready(f"http://127.0.0.1:{port}")
        scenario(f"http://127.0.0.1:{port}/v1", **{**load, "prompts": load["prompts"][:2], "mixes": load["mixes"][:2]})
        return scenario(f"http://127.0.0.1:{port}/v1", **load)
    finally:
        serve.shutdown()
        ray.shutdown()


def train_both(model: str, data_dir: str, names: list[str], config: LoraTrainConfig) -> dict:
    import ray

    from loramux.training.distributed import train_adapters_ray

    tasks = load_tasks(data_dir, names, "train")
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        train_adapters(load_base(model), tasks, Library(tmp / "seq", create=True), config)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        try:
            train_adapters_ray(model, tasks, Library(tmp / "ray", create=True), config, cpus_per_task=1)
        finally:
            ray.shutdown()
        end = time.perf_counter()
        return {"adapters": len(names), "steps": config.steps, "batch_size": config.batch_size,
                "sequential_s": round(sequential, 2), "ray_total_s": round(end - t0, 2),
                "ray_start_s": round(started - t0, 2), "ray_after_start_s": round(end - started, 2),
                "ray_landed": Library(tmp / "ray").names()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--train-tasks", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--output", default=str(RESULTS / "scale.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path

    rng = random.Random(0)
    library = str(args.library or default_library_path())
    lib = Library(library)
    names = lib.names()
    if not names:
        raise SystemExit(f"library {library} has no adapters; build it first (loramux train ...)")
    tasks = load_tasks(args.data_dir, sorted({t for s in lib.list() for t in s.tasks}), "test")
    pool = [ex.prompt for t in tasks for ex in t.examples[:4]]
    load = {"prompts": [rng.choice(pool) for _ in range(args.requests)],
            "mixes": [dict(zip(rng.sample(names, min(3, len(names))), (0.5, 0.3, 0.2))) for _ in range(args.requests)],
            "tokens": args.tokens, "concurrency": args.concurrency}
    serving = {"local": serve_local(args.model, library, load), "ray_serve_1_replica": serve_ray(args.model, library, load)}
    train_names = sorted({t for s in lib.list() for t in s.tasks})[: args.train_tasks]
    config = LoraTrainConfig(steps=args.train_steps, batch_size=4, warmup_steps=1, checkpoint_every=0)
    training = train_both(args.model, args.data_dir, train_names, config)
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "library_adapters": len(names), "serving": serving, "training": training,
        "ratios": {
            "ray_serve_vs_local_throughput": round(serving["ray_serve_1_replica"]["tokens_per_s"]
                                                   / serving["local"]["tokens_per_s"], 3),
            "ray_serve_vs_local_p50_latency": round(serving["ray_serve_1_replica"]["seconds_p50"]
                                                    / serving["local"]["seconds_p50"], 3),
            "ray_train_vs_sequential_time": round(training["ray_total_s"] / training["sequential_s"], 3),
        },
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios"], indent=1))


if __name__ == "__main__":
    main()
