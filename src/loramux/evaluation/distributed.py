"""`loramux eval --ray`: the harness's (strategy x task) cells as Ray tasks.

Each cell loads the base model, the library and its task in a worker and runs the same
`evaluate` on that one task and strategy; per-task samples are seeded per task and routing is
per prompt, so the assembled table equals a local run's.
"""

from __future__ import annotations

import time
from ..errors import LoramuxError
from .harness import EvalConfig


def _cell(model: str, library: str, data_dir: str, task: str, strategy: str, limit: int | None, seed: int,
          batch_size: int, home: str, device: str = "cpu", dtype: str = "float32") -> dict:
    import os

    os.environ["LORAMUX_HOME"] = home
    from ..data import load_tasks
    from ..fusion import FusedModel
    from ..library import Library
    from ..models import load_base
    from .harness import evaluate

    test = load_tasks(data_dir, [task], "test")
    r = evaluate(FusedModel(load_base(model, device=device, dtype=dtype)), Library(library), test,
                 EvalConfig((strategy,), limit, seed, batch_size), progress=False, log=lambda s: None)
    out = r["strategies"][strategy]
    return {"score": out["per_task"][task], "metric": out["metric"][task], "seconds": out["seconds"],
            "n": r["n_per_task"][task], "adapters": r["adapters"], "routing": r.get("routing", {}).get(strategy)}


def evaluate_ray(model: str, library: str, data_dir: str, tasks: list[str], config: EvalConfig, *,
                 address: str | None = None, cpus_per_cell: float = 1, max_retries: int = 2, log=print,
                 device: str = "cpu", dtype: str = "float32") -> dict:
    import ray
    from tqdm.auto import tqdm

    from .._home import loramux_home

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus_per_cell, max_retries=max_retries, retry_exceptions=True)(_cell)
    home = str(loramux_home())
    refs = {remote.remote(model, library, data_dir, t, s, config.limit_per_task, config.seed, config.batch_size, home,
                          device, dtype):
            (s, t) for s in config.strategies for t in tasks}
    cells, failed = {}, {}
    started = time.perf_counter()
    bar = tqdm(total=len(refs), desc=f"eval {len(refs)} cells on Ray", unit="cell")
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        key = refs.pop(done[0])
        try:
            cells[key] = ray.get(done[0])
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            failed[f"{key[0]}/{key[1]}"] = f"{type(cause).__name__}: {cause}"
        bar.update(1)
    bar.close()
    if failed:
        raise LoramuxError(f"{len(failed)} evaluation cells failed after {max_retries} retries: {failed}")
    result: dict = {"strategies": {}, "n_per_task": {t: cells[(config.strategies[0], t)]["n"] for t in tasks},
                    "seed": config.seed, "adapters": cells[(config.strategies[0], tasks[0])]["adapters"],
                    "wall_seconds": round(time.perf_counter() - started, 1)}
    for s in config.strategies:
        per_task = {t: cells[(s, t)]["score"] for t in tasks}
        result["strategies"][s] = {"per_task": per_task, "average": round(sum(per_task.values()) / len(per_task), 4),
                                   "metric": {t: cells[(s, t)]["metric"] for t in tasks},
                                   "seconds": round(sum(cells[(s, t)]["seconds"] for t in tasks), 1)}
        log(f"{s}: average {result['strategies'][s]['average']:.4f}")
        if cells[(s, tasks[0])]["routing"] is not None:  # a per-prompt router: the cells' confusions add up
            routing = [cells[(s, t)]["routing"] for t in tasks]
            counts = [[sum(r["confusion"][i][j] for r in routing) for j in range(len(row))]
                      for i, row in enumerate(routing[0]["confusion"])]
            hits, total = sum(counts[i][i] for i in range(len(counts))), sum(map(sum, counts))
            n = [sum(map(sum, r["confusion"])) for r in routing]  # prompts each cell's means are over

            def mean(key: str, digits: int) -> float:
                return round(sum(k * r[key] for k, r in zip(n, routing)) / max(1, total), digits)

            result.setdefault("routing", {})[s] = {"labels": routing[0]["labels"], "confusion": counts,
                                                   "top1_accuracy": round(hits / max(1, total), 4),
                                                   "mean_adapters": mean("mean_adapters", 3),
                                                   "mean_true_weight": mean("mean_true_weight", 4),
                                                   "abstained": sum(r.get("abstained", 0) for r in routing)}
    return result
