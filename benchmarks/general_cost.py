"""What a general adapter costs the in-forward routers: the forward of 8 x 96 tokens under Arrow
and the stored MoLE gates, over the 14-task library and over <library>-general (the same
adapters and gates plus the multi-task LoRA named general; benchmarks/unseen.py builds it), each
/ the base forward, measured side by side in one run. Arrow and the gates give the general
adapter weight 0, and the fused layer leaves it out of their forward (LayerMixture.slots); each
slot is laid out at its own rank (fusion/layer.py), so a rank-112 general adapter widens only
itself where a mixture does select it. Writes benchmarks/results/general_cost.json.

`--stand-in-general R` times a random rank-R LoRA on the library's modules named general instead
of the multi-task LoRA (whose 840 steps take over an hour): a forward's time depends on the shapes
alone. `--label L` keeps the run under `runs[L]` of the output beside earlier labels (the same
script run over two versions of loramux, one after the other: PYTHONPATH picks the version).

    python benchmarks/general_cost.py [--reps 5] [--stand-in-general 112 --label own_ranks]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from composite import RESULTS, copy_routers, kind_ratios, library_sha, log

from loramux import Library, load_base
from loramux.bench.machine import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--output", default=str(RESULTS / "general_cost.json"))
    ap.add_argument("--stand-in-general", type=int, default=0, metavar="RANK",
                    help="time a random LoRA of this rank as the general adapter (no multi-task LoRA needed)")
    ap.add_argument("--label", default=None, help="keep this run under runs[LABEL] beside the output's others")
    args = ap.parse_args()
    from loramux._home import default_library_path

    lib = Library(Path(args.library or default_library_path()))
    base = load_base()
    if args.stand_in_general:
        general, name = stand_in_general(base, lib, args.stand_in_general), "general-standin"
    else:
        side, name = lib.path.with_name(lib.path.name + "-general"), "multitask"
        if not (side / "loramux-library.json").is_file():
            raise SystemExit(f"{side} is missing: run benchmarks/unseen.py --strategies arrow_abstain_general first, "
                             f"or time a stand-in with --stand-in-general 112")
        general = Library(side)
    ratios = {}
    for where, library in (("library", lib), ("with_general", general)):
        log(f"timing the forwards over {library.path.name}")
        ratios[where] = kind_ratios(base, library, reps=args.reps)
    compared = [k for k in ratios["library"] if k not in ("base", "oracle", "uniform", "dlp")
                and k in ratios["with_general"]]
    run = {
        "what": f"forward of 8 x 96 tokens / the base forward; `with_general` loads {name} (rank "
                f"{general.get(name).rank}) beside the {len(lib.names())} adapters (rank "
                f"{max(lib.get(n).rank for n in lib.names())}) and names it general: Arrow and the gates give it "
                "weight 0. Only the in-forward routers are compared: the sequence mixtures of the two libraries "
                "are not the same mixtures (uniform and the first adapter include or are the general one there)."
                + (" MoLE: no stored gate set in this library, not timed." if not compared[1:] else ""),
        "ratios": ratios,
        "general_over_plain": {k: round(ratios["with_general"][k] / ratios["library"][k], 3) for k in compared},
        "library_sha": library_sha(lib), "general": name, "loramux": source_commit(),
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    if name == "general-standin":
        run["stand_in"] = (f"a random rank-{args.stand_in_general} LoRA on the modules the library's adapters adapt: "
                           "its weights do not change a forward's time")
    result = run
    if args.label:
        out = Path(args.output)
        earlier = json.loads(out.read_text()) if out.is_file() else {}
        result = {**earlier, "runs": {**earlier.get("runs", {}), args.label: run}}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.output}: {run['general_over_plain']}")


def source_commit() -> str:
    """The commit of the loramux source this run imported (PYTHONPATH may pick another checkout)."""
    import subprocess

    import loramux

    where = Path(loramux.__file__).resolve().parent
    run = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return f"{run.stdout.strip() or 'unknown'} ({where})"


def stand_in_general(base, lib: Library, rank: int) -> Library:
    """<library>-general-standin: the library's adapters plus `general-standin`, a random rank-`rank` LoRA
    on the modules they adapt, named general (built once; its weights only shape the timing)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    side = Library(lib.path.with_name(lib.path.name + "-general-standin"), create=True)
    for n in lib.names():
        if n not in side:
            side.add(n, lib.adapter_dir(n), base=base, tasks=lib.get(n).tasks, training=lib.get(n).training)
    if "general-standin" not in side:
        first = lib.adapter_dir(lib.names()[0])
        config = json.loads((first / "adapter_config.json").read_text())
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for name, mod in base.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in config["target_modules"] and \
                    name.startswith("model.layers."):
                tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.01
                tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.01
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_config.json").write_text(json.dumps({**config, "r": rank, "lora_alpha": 2 * rank}))
            save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"))
            side.add("general-standin", tmp, base=base)
    side.set_general("general-standin")
    copy_routers(lib, side)  # the stored MoLE gates, timed over both libraries
    return side


if __name__ == "__main__":
    main()
