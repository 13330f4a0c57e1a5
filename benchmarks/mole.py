"""MoLE benchmark (issue 6): gates at layer and block granularity, with and without the balance
loss, vs the uniform mixture and the oracle, on all test sets mixed; the effect of masking the
true task's adapter; gate training time and gating cost.

Reuses composite.py's builders (library, gates cached in the library under mole_layer,
mole_block, mole_layer_no_balance).

    python benchmarks/mole.py --data-dir ../shared/data/bigbench [--limit-per-task 40] [--mole-steps 30]

Writes benchmarks/results/mole.json.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from composite import MOLE, common_args, cost_ratios, ensure_mole, log, setup

from loramux import load_tasks
from loramux.bench.machine import machine
from loramux.evaluation import MixtureScorer
from loramux.evaluation.harness import EvalConfig, evaluate, sample_indices
from loramux.evaluation.scoring import result_of
from loramux.fusion import FusedModel

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--mole-steps", type=int, default=30)
    ap.add_argument("--output", default=str(RESULTS / "mole.json"))
    args = ap.parse_args()

    from loramux._home import prediction_cache_path
    from loramux.routers import load_router

    started = time.perf_counter()
    base, lib, tasks = setup(args)
    timings: dict = {}
    ensure_mole(base, lib, args.data_dir, args.mole_steps, timings)
    for name in MOLE:  # training time as recorded when the gates were trained
        info = json.loads((lib.router_dir(name) / "router.json").read_text()).get("info", {})
        timings.setdefault(name, info.get("seconds"))
    test = load_tasks(args.data_dir, tasks, "test")
    strategies = ("oracle", "uniform", *(f"mole:{m}" for m in MOLE))
    fused = FusedModel(base)
    result = evaluate(fused, lib, test, EvalConfig(strategies, args.limit_per_task, args.seed, cache_dir=str(prediction_cache_path())), log=log)
    averages = {k.removeprefix("mole:"): v["average"] for k, v in result["strategies"].items()}
    # masking: each task's own adapter switched off in the layer-wise gates, the rest renormalised
    owner = {t: s.name for s in lib.list() for t in s.tasks}
    idx = sample_indices(test, args.limit_per_task, args.seed)
    scorer = MixtureScorer(fused, cache_dir=str(prediction_cache_path()))
    masked = {}
    for t in test:
        router = load_router(lib, "mole", name="mole_layer", fused=fused, mask=(owner[t.name],))
        preds = scorer.score(t, [router] * len(idx[t.name]), idx[t.name])
        masked[t.name] = round(result_of(t, preds).score, 4)
    averages["mole_layer_mask_true_task"] = round(sum(masked.values()) / len(masked), 4)
    fused.unfuse()
    costs = cost_ratios(base, lib, ["uniform", "mole_layer"])
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "limit_per_task": args.limit_per_task, "mole_steps": args.mole_steps,
        "average_accuracy": averages,
        "per_task": {k.removeprefix("mole:"): v["per_task"] for k, v in result["strategies"].items()}
        | {"mole_layer_mask_true_task": masked},
        "gate_cost_ratio": costs.get("_gate_cost_ratio"), "train_seconds": timings,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("average_accuracy", "gate_cost_ratio", "train_seconds")}, indent=1))


if __name__ == "__main__":
    main()
