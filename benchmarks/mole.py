"""MoLE benchmark: gates at layer and block granularity, with and without the balance loss, vs
the uniform mixture and the oracle, on all test sets mixed; the effect of masking the true task's
adapter; gate training time and gating cost; each gate set's validation curve (training stops
when it flattens) and, per task, the weight the gates give each adapter in every layer or block.

Reuses composite.py's builders (library, gates cached in the library under mole_layer,
mole_block, mole_layer_no_balance, mole_layer_pooled, mole_layer_routed).

    python benchmarks/mole.py --data-dir ../shared/data/bigbench [--limit-per-task 40] [--mole-steps 400]
        [--profile-per-task 8] [--gates mole_layer,mole_block,mole_layer_no_balance,mole_layer_pooled,
        mole_layer_routed] [--mask-gates mole_layer] [--calibrate-sharpen 1,1.5,2,3,4]

Writes benchmarks/results/mole.json (or --output), <output stem>_curves.png and
<output stem>_gates_<name>.png.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from composite import MOLE, NEEDS_GRID, common_args, cost_ratios, ensure_mole, gate_info, library_sha, log, setup

from loramux import load_tasks
from loramux.bench.machine import machine
from loramux.evaluation import MixtureScorer
from loramux.evaluation.harness import EvalConfig, evaluate, sample_indices
from loramux.evaluation.scoring import result_of
from loramux.fusion import FusedModel
from loramux.routers.gating import MoleTrainConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--mole-steps", type=int, default=MoleTrainConfig().steps, help="at most (validation stops it)")
    ap.add_argument("--profile-per-task", type=int, default=8, help="test prompts per task for the gate profiles")
    ap.add_argument("--gates", default=",".join(m for m in MOLE if m not in NEEDS_GRID), help="which gate sets to train and score; one 14-adapter "
                    "set takes up to ~90 min on 2 cores")
    ap.add_argument("--mask-gates", default=None, help="the gate set scored with each task's own adapter masked "
                    "(default: the first of --gates)")
    ap.add_argument("--calibrate-sharpen", default=None, metavar="GRID",
                    help="e.g. 1,1.5,2,3,4: choose each gate set's inference sharpening on its held-out validation "
                         "examples (routers/gating/calibrate.py) and store it with the gates before scoring")
    ap.add_argument("--output", default=str(RESULTS / "mole.json"))
    args = ap.parse_args()
    gates = tuple(args.gates.split(","))
    if unknown := set(gates) - set(MOLE):
        ap.error(f"--gates: unknown {sorted(unknown)}; accepted: {', '.join(MOLE)}")
    masked_set = args.mask_gates or gates[0]
    if masked_set not in gates:
        ap.error(f"--mask-gates: {masked_set!r} is not among --gates {list(gates)}")

    from loramux._home import prediction_cache_path
    from loramux.routers import load_router

    started = time.perf_counter()
    base, lib, tasks = setup(args)
    timings: dict = {}
    grid = tuple(float(g) for g in args.calibrate_sharpen.split(",")) if args.calibrate_sharpen else ()
    trained = ensure_mole(base, lib, args.data_dir, args.mole_steps, timings, gates, sharpen_grid=grid)
    if grid:  # the gates trained just now were calibrated before they were saved
        from loramux.routers.gating import calibrate_sharpen

        train_tasks = load_tasks(args.data_dir, tasks, "train")
        for name in (g for g in gates if g not in trained):
            fused = FusedModel(base)
            router = load_router(lib, "mole", name=name, fused=fused)
            calibrate_sharpen(router, train_tasks, grid, log=log)
            router.save(lib, name)
            fused.unfuse()
    training = {}
    for name in gates:  # training time and curve as recorded when the gates were trained
        info = gate_info(lib, name)
        timings.setdefault(name, info.get("seconds"))
        training[name] = {k: info.get(k) for k in ("train_config", "steps_run", "stopped", "best_step",
                                                   "best_val_task_loss", "gate_params", "curve", "sharpen",
                                                   "sharpen_curve", "sharpen_examples", "gate_pool",
                                                   "kept_by", "sharpen_curves_by_step")}
    test = load_tasks(args.data_dir, tasks, "test")
    strategies = ("oracle", "uniform", *(f"mole:{m}" for m in gates))
    fused = FusedModel(base)
    result = evaluate(fused, lib, test, EvalConfig(strategies, args.limit_per_task, args.seed, cache_dir=str(prediction_cache_path())), log=log)
    averages = {k.removeprefix("mole:"): v["average"] for k, v in result["strategies"].items()}
    # masking: each task's own adapter switched off in the masked gate set, the rest renormalised
    owner = {t: s.name for s in lib.list() for t in s.tasks}
    idx = sample_indices(test, args.limit_per_task, args.seed)
    scorer = MixtureScorer(fused, cache_dir=str(prediction_cache_path()))
    masked = {}
    for t in test:
        router = load_router(lib, "mole", name=masked_set, fused=fused, mask=(owner[t.name],))
        preds = scorer.score(t, [router] * len(idx[t.name]), idx[t.name])
        masked[t.name] = round(result_of(t, preds).score, 4)
    averages[f"{masked_set}_mask_true_task"] = round(sum(masked.values()) / len(masked), 4)
    profiles = {name: gate_profile(load_router(lib, "mole", name=name, fused=fused), test, owner,
                                   args.profile_per_task) for name in gates}
    fused.unfuse()
    costs = cost_ratios(base, lib, ["uniform", gates[0]])
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "library_sha": library_sha(lib), "limit_per_task": args.limit_per_task,
        "mole_steps": args.mole_steps, "gates": list(gates),
        "average_accuracy": averages,
        "per_task": {k.removeprefix("mole:"): v["per_task"] for k, v in result["strategies"].items()}
        | {f"{masked_set}_mask_true_task": masked},
        "gate_cost_ratio": costs.get("_gate_cost_ratio"), "train_seconds": timings,
        "masked_gates": masked_set,
        "mask_true_task_cost_points": round(100 * (averages[masked_set] - averages[f"{masked_set}_mask_true_task"]), 2),
        "training": training,
        "gate_profiles": profiles,
        "gate_profiles_how": (f"per task, the mean over {args.profile_per_task} of its test prompts of each unit's gate "
                              f"weights: own_by_unit is the weight on the task's own adapter in each layer or block "
                              f"(forward order), mean the weights averaged over units, top the adapter with the "
                              f"largest mean; same_pick_share the share of units whose top adapter is the same for "
                              f"all those prompts, mean_top_weight a unit's largest weight on average; "
                              f"_across_tasks: for two tasks' first prompts, the share of units with the same top "
                              f"adapter, averaged over task pairs (1.0 everywhere: gates that ignore the input)"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.output))
    print(json.dumps({k: out[k] for k in ("average_accuracy", "gate_cost_ratio", "train_seconds")}, indent=1))


def gate_profile(router, test, owner: dict, per_task: int) -> dict:
    """Task -> what the gates give its prompts: the own adapter's weight per unit, the mean
    weights over units, the adapter with the largest mean, the share of units whose top adapter
    is the same for all the task's prompts (same_pick_share) and a unit's largest weight on average
    (mean_top_weight); under "_across_tasks", the share of units whose top adapter agrees between
    two tasks' first prompts, averaged over task pairs (None with one task)."""
    out, firsts = {}, {}
    for t in test:
        prompts = [e.prompt for e in t.examples[:per_task]]
        routings = [r for b in range(0, len(prompts), 8) for r in router.route(prompts[b:b + 8])]
        units = list(routings[0].layers)
        mean_by_unit = {u: {a: sum(r.layers[u][a] for r in routings) / len(routings) for a in router.adapters}
                        for u in units}
        mean = {a: round(sum(mean_by_unit[u][a] for u in units) / len(units), 4) for a in router.adapters}
        picks = [[max(r.layers[u], key=r.layers[u].get) for u in units] for r in routings]  # prompt -> unit -> top
        firsts[t.name] = picks[0]
        out[t.name] = {"own": owner[t.name], "own_by_unit": [round(mean_by_unit[u][owner[t.name]], 4) for u in units],
                       "mean": mean, "top": max(mean, key=mean.get),
                       # gates that ignore the input pick the same adapter for every prompt
                       "same_pick_share": round(sum(len({p[i] for p in picks}) == 1 for i in range(len(units)))
                                                / len(units), 4),
                       "mean_top_weight": round(sum(max(r.layers[u].values()) for r in routings for u in units)
                                                / (len(routings) * len(units)), 4)}
    # the first prompt of two tasks: the share of units that pick the same adapter for both
    names = sorted(firsts)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    agree = [sum(x == y for x, y in zip(firsts[a], firsts[b])) / len(firsts[a]) for a, b in pairs]
    out["_across_tasks"] = {"same_pick_share_mean": round(sum(agree) / len(agree), 4) if agree else None}
    return out


def plot(out: dict, output: Path) -> None:
    """<output stem>_curves.png (validation curves) and <output stem>_gates_<name>.png (own-adapter
    weight per task and unit), beside the output."""
    from loramux.evaluation.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, info in out["training"].items():
        curve = [c for c in info.get("curve") or [] if "val_task_loss" in c]
        if curve:
            ax.plot([c["step"] for c in curve], [c["val_task_loss"] for c in curve], marker="o", label=f"{name} (val)")
            trained = [c for c in curve if "train_task_loss" in c]  # not the routing start's step 0
            ax.plot([c["step"] for c in trained], [c["train_task_loss"] for c in trained], ls=":", alpha=0.6,
                    label=f"{name} (train)")
    ax.set_xlabel("gate training step")
    ax.set_ylabel("answer loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    results = output.parent
    fig.savefig(results / f"{output.stem}_curves.png", dpi=120)
    plt.close(fig)
    for name, profile in out["gate_profiles"].items():
        tasks = sorted(t for t in profile if not t.startswith("_"))
        grid = [profile[t]["own_by_unit"] for t in tasks]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(tasks) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(max(r) for r in grid))
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("gated unit (forward order)")
        ax.set_title(f"{name}: gate weight on each task's own adapter (uniform = {1 / len(tasks):.3f})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(results / f"{output.stem}_gates_{name}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
