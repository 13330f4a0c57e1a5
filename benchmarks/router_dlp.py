"""DLP-LoRA benchmark: router accuracy, latency, and routed vs oracle vs base on the mixed test sets.

Needs a library with one adapter per task (`loramux train --data-dir ../shared/data/bigbench`).
Trains the `dlp` router into it with loramux's defaults unless a current one is stored, then:

  router    accuracy on every test.json prompt (top-1 adapter == the prompt's task), per task,
            confusion matrix (JSON + PNG), router latency at batch 1 and 32, and routing's share
            of a 32-token routed generation;
  composite all test sets mixed and shuffled, each prompt routed on its own; accuracy per task of
            DLP vs the oracle (the task's own adapter) vs the base model (scorer of `loramux score`).

    python benchmarks/router_dlp.py --data-dir ../shared/data/bigbench [--library DIR]
        [--parts router,composite] [--per-task N]

Results merge into benchmarks/results/router_dlp.json (each part can be rerun on its own).
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

from loramux import Library, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.bench.speed import _median_times
from loramux.engine import Engine
from loramux.evaluation.plots import plot_confusion

RESULTS = Path(__file__).parent / "results"


def get_router(lib: Library, data_dir: str, retrain: bool):
    from loramux.routers import load_router
    from loramux.routers.sentence import train_dlp

    if not retrain and "dlp" in lib.routers():
        try:
            return load_router(lib, "dlp"), None
        except Exception as e:  # stale: the library changed since
            print(f"retraining: {e}", file=sys.stderr)
    tasks = load_tasks(data_dir, sorted({t for s in lib.list() for t in s.tasks}), "train")
    t = time.perf_counter()
    router = train_dlp(lib, tasks)
    seconds = time.perf_counter() - t
    router.save(lib)
    return router, round(seconds, 1)


def timed(fn, reps: int) -> float:
    return _median_times({"fn": fn}, reps, warmup=0)["fn"]


def router_part(router, lib: Library, test_tasks, owner: dict[str, str]) -> dict:
    from sklearn.metrics import confusion_matrix

    from loramux.routers.sentence import encode_cached

    prompts = [ex.prompt for t in test_tasks for ex in t.examples]
    truth = [owner[t.name] for t in test_tasks for _ in t.examples]
    emb = encode_cached(router.encoder, prompts, progress=True)
    with torch.no_grad():
        probs = torch.softmax(router.head(emb), -1)
    routings = router.decide(probs, emb)
    top1 = [r.adapters[0] for r in routings]
    names = router.adapters
    cm = confusion_matrix(truth, top1, labels=names)
    per_task = {}
    for t in test_tasks:
        k = names.index(owner[t.name])
        per_task[t.name] = round(float(cm[k, k] / cm[k].sum()), 4)
    accuracy = sum(a == b for a, b in zip(top1, truth)) / len(truth)
    sizes = [len(r.adapters) for r in routings]
    sweep = {}
    for p in (0.3, 0.6, 0.8, 0.9, 1.0):
        rs = router.decide(probs, emb, top_p=p)
        sweep[str(p)] = {"mean_adapters": round(statistics.mean(len(r.adapters) for r in rs), 3),
                         "single_adapter_share": round(sum(len(r.adapters) == 1 for r in rs) / len(rs), 4)}

    # latency: the whole route() (encode + head + selection), uncached
    sample = prompts[:: max(1, len(prompts) // 64)][:64]
    router.route(sample[:4])  # warm-up
    b1 = statistics.median([timed(lambda p=p: router.route([p]), 1) for p in sample[:32]])
    b32 = timed(lambda: router.route(sample[:32]), 5) / 32
    return {"accuracy": round(accuracy, 4), "per_task_accuracy": per_task, "n_test": len(truth),
            "adapters": names, "confusion_matrix": cm.tolist(), "top_p_sweep": sweep,
            "selected_adapters_mean": round(statistics.mean(sizes), 3),
            "latency_ms_b1": round(1000 * b1, 2), "latency_ms_b32": round(1000 * b32, 2), "_cm": cm}


def share_part(router, engine, test_tasks) -> dict:
    """Routing time as a share of a routed 32-token generation (batch 1, medians)."""
    from loramux.engine import GenerationRequest, SamplingParams

    prompts = [t.examples[0].prompt for t in test_tasks][:8]
    sampling = SamplingParams(max_new_tokens=32, ignore_eos=True)
    # Adapters resident first, as in a server: the first use of an adapter otherwise reads it from
    # disk inside engine.route, and that load (not routing) was most of the 4.8% measured before.
    t = time.perf_counter()
    for name in router.adapters:
        if name not in engine.fused.adapters:
            engine.load(name)
    load_s = time.perf_counter() - t
    engine.generate([GenerationRequest(prompts[0], sampling=sampling)], router=router)  # warm-up
    route_s, total_s = [], []
    for p in prompts:
        t = time.perf_counter()
        [req] = engine.route([GenerationRequest(p, sampling=sampling)], router)
        t_route = time.perf_counter() - t
        engine.generate([req])
        route_s.append(t_route)
        total_s.append(time.perf_counter() - t)
    return {"routing_share_of_generation": round(statistics.median(r / s for r, s in zip(route_s, total_s)), 4),
            "route_seconds_b1": round(statistics.median(route_s), 4),
            "routed_generation_seconds_32_tokens": round(statistics.median(total_s), 3),
            "adapter_load_seconds_all": round(load_s, 3)}


def composite_part(router, fused, lib: Library, test_tasks, owner, per_task: int | None, seed: int) -> dict:
    """All test sets pooled and shuffled, each prompt routed on its own (the harness's composite mode)."""
    from loramux._home import prediction_cache_path
    from loramux.evaluation.harness import EvalConfig, evaluate, sample_indices

    t0 = time.perf_counter()
    r = evaluate(fused, lib, test_tasks, EvalConfig(("base", "oracle", "dlp"), per_task, seed, cache_dir=str(prediction_cache_path())),
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    out = {k: v["per_task"] for k, v in r["strategies"].items()}
    average = {k: v["average"] for k, v in r["strategies"].items()}
    # how often the routed mixture is exactly the oracle's (the scorer then reuses its predictions)
    idx = sample_indices(test_tasks, per_task, seed)
    prompts = [(t.name, t.examples[i].prompt) for t in test_tasks for i in idx[t.name]]
    same = sum(rt.mixture == {owner[n]: 1.0} for (n, _), rt in zip(prompts, router.route([p for _, p in prompts])))
    return {
        "n_per_task": r["n_per_task"], "n_total": len(prompts), "seed": seed, "per_task": out, "average": average,
        "dlp_minus_oracle_points": round(100 * (average["dlp"] - average["oracle"]), 2),
        "dlp_equals_oracle_mixture": same, "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--parts", default="router,composite")
    ap.add_argument("--per-task", type=int, default=None, help="composite: test prompts per task (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--output", default=str(RESULTS / "router_dlp.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path

    lib = Library(args.library or default_library_path())
    owner = {t: s.name for s in lib.list() for t in s.tasks}
    test_tasks = load_tasks(args.data_dir, sorted(owner), "test")
    out_path = Path(args.output)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    router, train_seconds = get_router(lib, args.data_dir, args.retrain)
    info = router.info
    result.update({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "library": {"adapters": len(owner), "tasks": sorted(owner)},
        "head_params": router.head.n_params, "encoder": router.encoder.spec, "selection": router.config.__dict__,
        "router_training": {k: info.get(k) for k in ("n_train", "n_val", "best_epoch", "val_loss", "val_accuracy")}
        | ({"seconds": train_seconds} if train_seconds is not None else {}),
    })
    parts = set(args.parts.split(","))
    # one fused model over the base serves the routed generations and the composite scoring
    engine = Engine(load_base(), lib) if parts & {"router", "composite"} else None
    if "router" in parts:
        r = router_part(router, lib, test_tasks, owner)
        cm = r.pop("_cm")
        plot_confusion(cm, router.adapters, out_path.with_name(out_path.stem + "_confusion.png"),
                       title="DLP router on the 14 BIG-bench test sets")
        out_path.with_name(out_path.stem + "_confusion.json").write_text(json.dumps(
            {"labels": router.adapters, "rows": "prompt's task (its adapter)", "columns": "top-1 routed adapter",
             "matrix": cm.tolist()}, indent=1) + "\n")
        r.pop("confusion_matrix")
        r.update(share_part(router, engine, test_tasks))
        result.update(r)
        result["command_router"] = "python " + " ".join(sys.argv)
        out_path.write_text(json.dumps(result, indent=1) + "\n")  # kept even if the composite part fails
    if "composite" in parts:
        result["composite"] = composite_part(router, engine.fused, lib, test_tasks, owner, args.per_task, args.seed)
        result["command_composite"] = "python " + " ".join(sys.argv)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_task_accuracy", "machine")}, indent=1))


if __name__ == "__main__":
    main()
