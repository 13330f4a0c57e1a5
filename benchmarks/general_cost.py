"""What a general adapter costs the in-forward routers: the forward of 8 x 96 tokens under Arrow
and the stored MoLE gates, over the 14-task library and over <library>-general (the same
adapters and gates plus the multi-task LoRA named general; benchmarks/unseen.py builds it), each
/ the base forward, measured side by side in one run. The fused layer pads every slot to the
largest rank (fusion/layer.py), so a rank-112 general adapter loaded beside rank-8 adapters
widens every slot even though no router gives it weight. Writes benchmarks/results/general_cost.json.

    python benchmarks/general_cost.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from composite import RESULTS, kind_ratios, library_sha, log

from loramux import Library, load_base
from loramux.bench.machine import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--output", default=str(RESULTS / "general_cost.json"))
    args = ap.parse_args()
    from loramux._home import default_library_path

    lib = Library(Path(args.library or default_library_path()))
    side = lib.path.with_name(lib.path.name + "-general")
    if not (side / "loramux-library.json").is_file():
        raise SystemExit(f"{side} is missing: run benchmarks/unseen.py --strategies arrow_abstain_general first")
    general = Library(side)
    base = load_base()
    ratios = {}
    for where, library in (("library", lib), ("with_general", general)):
        log(f"timing the forwards over {library.path.name}")
        ratios[where] = kind_ratios(base, library, reps=args.reps)
    compared = [k for k in ratios["library"] if k not in ("base", "oracle", "uniform", "dlp")
                and k in ratios["with_general"]]
    result = {
        "what": "forward of 8 x 96 tokens / the base forward; `with_general` loads the multi-task LoRA (rank "
                f"{general.get('multitask').rank}) beside the {len(lib.names())} adapters (rank "
                f"{max(lib.get(n).rank for n in lib.names())}) and names it general: Arrow and the gates give it "
                "weight 0. Only the in-forward routers are compared: the sequence mixtures of the two libraries "
                "are not the same mixtures (uniform and the first adapter include or are the general one there).",
        "ratios": ratios,
        "general_over_plain": {k: round(ratios["with_general"][k] / ratios["library"][k], 3) for k in compared},
        "library_sha": library_sha(lib), "general": "multitask",
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.output}: {result['general_over_plain']}")


if __name__ == "__main__":
    main()
