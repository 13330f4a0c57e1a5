"""What `--quantize` costs in accuracy: the composite (the evaluation harness on the library's
tasks) with the fp32 base and with each quantized base (int8, w8a8), side by side in one run, same
prompts, same adapters. Writes benchmarks/results/quantize_accuracy.json.

    python benchmarks/quantize_accuracy.py [--data-dir ../shared/data/bigbench] [--library L]
        [--strategies base,oracle] [--limit-per-task 40] [--quantize int8,w8a8]

`base` measures the quantized base alone; `oracle` (each prompt with its own task's adapter)
measures fp32 adapters over the quantized base, what a served adapter sees. Per task and average,
in the harness's metric per task (the composite's), and each mode's change in points.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from composite import RESULTS, common_args, log

from loramux import Library, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.evaluation.harness import EvalConfig, evaluate
from loramux.fusion import FusedModel


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--strategies", default="base,oracle")
    ap.add_argument("--quantize", default="int8,w8a8", help="the quantized bases, each against fp32")
    ap.add_argument("--output", default=str(RESULTS / "quantize_accuracy.json"))
    args = ap.parse_args()
    from loramux._home import default_library_path

    lib = Library(Path(args.library or default_library_path()))
    tasks = args.tasks.split(",") if args.tasks else sorted({t for s in lib.list() for t in s.tasks})
    test = load_tasks(args.data_dir, tasks, "test")
    config = EvalConfig(tuple(args.strategies.split(",")), args.limit_per_task, args.seed)
    runs = {}
    modes = [m for m in args.quantize.split(",") if m]
    for quantize in ["none", *modes]:
        fused = FusedModel(load_base(args.model, quantize=quantize) if args.model else load_base(quantize=quantize))
        runs[quantize] = evaluate(fused, lib, test, config, log=log)
        fused.unfuse()
    out: dict = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine(), "library": str(lib.path), "limit_per_task": args.limit_per_task, "seed": args.seed,
                 "n_per_task": runs["none"]["n_per_task"], "strategies": {}}
    for s in config.strategies:
        got = {"fp32": runs["none"]["strategies"][s]} | {m: runs[m]["strategies"][s] for m in modes}
        out["strategies"][s] = {m: r["average"] for m, r in got.items()} | {
            "change_points": {m: round(100 * (got[m]["average"] - got["fp32"]["average"]), 2) for m in modes},
            "per_task": {t: {m: r["per_task"][t] for m, r in got.items()} for t in got["fp32"]["per_task"]},
            "metric": got["fp32"]["metric"]}
        log(f"{s}: " + ", ".join(f"{m} {r['average']:.4f}" for m, r in got.items()))
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
