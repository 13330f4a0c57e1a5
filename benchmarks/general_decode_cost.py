"""What a general adapter costs the compiled decode path: tokens/s of 8 concurrent greedy requests
through the scheduler with the compiled step, over the 14-task library and over the same library
with a random rank-R stand-in named general (general_cost.py builds it; the time depends on the
shapes alone), measured side by side in one process.

Workloads: `routed`, each row on one routed adapter (DLP's top-1; no row mixes the general
adapter), and `two_general`, the same with 2 of the 8 rows on the general adapter (prompts the
router abstained on). The compiled engine's adapter table (engine/compiled.py, `Slots`) holds
`width` rank columns per position; run over two versions of loramux (PYTHONPATH, `--label`) it
shows what padding every position to the general adapter's rank cost.

    python benchmarks/general_decode_cost.py [--stand-in-general 112] [--tokens 32] [--rounds 3] [--label L]

Writes benchmarks/results/general_decode_cost.json (`runs[label]`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from compiled_decode import PROMPTS, run
from composite import RESULTS, log
from general_cost import source_commit, stand_in_general

from loramux import Library, load_base
from loramux.bench.machine import machine
from loramux.cpu_linear import pack_linears
from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.engine.compiled import CompiledDecoder


def main() -> None:
    from loramux._home import default_library_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--stand-in-general", type=int, default=112, metavar="RANK")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--label", default="current")
    ap.add_argument("--output", default=str(RESULTS / "general_decode_cost.json"))
    args = ap.parse_args()

    lib = Library(Path(args.library or default_library_path()))
    base = load_base()
    side = stand_in_general(base, lib, args.stand_in_general)
    names = lib.names()
    pack_linears(base.model)
    sampling = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)

    def requests(general: int) -> list[GenerationRequest]:
        mixes = [{names[i % len(names)]: 1.0} for i in range(args.rows)]
        for i in range(general):
            mixes[i] = {"general-standin": 1.0}
        return [GenerationRequest(PROMPTS[i % len(PROMPTS)], m, sampling) for i, m in enumerate(mixes)]

    # one engine (two would fuse the same base twice): the general adapter loaded for the rows over
    # the library with it, unloaded for the rows over the library alone (Slots sizes its table per batch)
    engine = Engine(base, side)
    for n in names:
        engine.load(n)
    engine.compiled = CompiledDecoder(engine.fused)

    def over(where: str) -> Engine:
        loaded = "general-standin" in engine.adapters
        if where == "with_general" and not loaded:
            engine.load("general-standin")
        elif where == "library" and loaded:
            engine.unload("general-standin")
        return engine

    workloads = {"routed": {"library": requests(0), "with_general": requests(0)},
                 "two_general": {"with_general": requests(2)}}
    speeds: dict = {}
    widths = {}
    for name, by_engine in workloads.items():
        for where, reqs in by_engine.items():
            t0 = time.perf_counter()
            run(over(where), reqs, args.rows)  # compiles or loads this shape
            widths[where] = engine.compiled.slots().width
            log(f"{name} over {where}: first run {time.perf_counter() - t0:.1f} s")
    for _ in range(args.rounds):  # interleaved, so that the machine's drift hits every row alike
        for name, by_engine in workloads.items():
            for where, reqs in by_engine.items():
                speeds.setdefault(f"{name}/{where}", []).append(run(over(where), reqs, args.rows)[0])
    med = {k: round(statistics.median(v), 2) for k, v in speeds.items()}
    ratio = {"routed": round(med["routed/with_general"] / med["routed/library"], 3),
             "two_general": round(med["two_general/with_general"] / med["routed/library"], 3)}
    log(f"tokens/s {med}; / library {ratio}")
    out_path = Path(args.output)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    out.setdefault("runs", {})[args.label] = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loramux": source_commit(), "machine": machine(), "rows": args.rows, "tokens": args.tokens,
        "rounds": args.rounds, "stand_in_general_rank": args.stand_in_general, "adapters": len(names),
        "table_width": widths, "tokens_per_s_median": med,
        "all": {k: [round(x, 2) for x in v] for k, v in speeds.items()},
        "tokens_per_s_vs_library": ratio,
    }
    out["what"] = ("compiled decode, 8 concurrent greedy requests, tokens/s (prefill included) as a share of the "
                   "same rows over the library without a general adapter (`tokens_per_s_vs_library`: 1.0 costs "
                   "nothing); routed: no row mixes the general adapter; two_general: 2 of 8 rows do")
    out_path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
