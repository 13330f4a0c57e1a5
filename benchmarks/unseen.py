"""Tasks outside the library: the 14-task library scored zero-shot on 8 BIG-bench tasks that no
adapter was trained on, every strategy through one harness. Writes benchmarks/results/unseen.json
(`average` {strategy: score}, `per_task`, `correct`: each prompt's 1/0, and `versus`: every
strategy minus base and minus the multi-task LoRA in points, with a paired bootstrap interval over
the prompts), a row as soon as it is scored; a rerun keeps rows whose recipe is unchanged, so the
run can span sessions. `--limit-per-task 0` scores every test prompt (533 over the 8 tasks).

    python benchmarks/unseen.py [--data-dir ../shared/data/bigbench] [--limit-per-task 40]
        [--strategies base,uniform,...] [--mole-steps 400] [--multitask-steps 0] [--mbc-k 5]

The tasks (snarks, ruin_names, movie_recommendation, anachronisms, emoji_movie,
analogical_similarity, metaphor_boolean, fantasy_reasoning) are fetched with `loramux data fetch
bigbench` into $LORAMUX_HOME/data/unseen and never committed. The library, its DLP router, MoLE
gates, merges, multi-task LoRA and MBC cluster library are composite.py's, built (or reused) in
the same cache. Strategies:
  base; uniform (every adapter, equal weights); dlp (the stored router, abstaining by its stored
  per-adapter thresholds); dlp_soft (top-p 0.9 over related adapters, never abstaining); arrow;
  arrow_gks (Arrow over ΔW_i − mean ΔW: general knowledge subtraction, PEFT's `use_gks`, with the
  library's own mean as the general knowledge, since a task library has no general adapters);
  mbc_arrow; mole (layer gates, balanced per gate); mole_pooled (layer gates with the paper's
  balance pooled over gates); mole_routed (layer gates with loramux's routing term); mole_routed_init
  (the same, fitted to route before training: route_init.py); mole_route_start (an ablation: that
  start alone, not trained after it); mole_routed_init_chosen (the start or the trained gates,
  whichever the sharpened validation loss keeps: calibrate.py; trained by mole.py
  --calibrate-sharpen first); ties; multitask;
  and, behind the library's DLP out-of-library test (a prompt it rejects goes to the base model):
  dlp_soft_abstain (top-p 0.9, the test on: what `top_p: 0.9` serves by default), arrow_abstain,
  arrow_gks_abstain, mole_routed_abstain, mole_routed_init_abstain, mole_route_start_abstain,
  mole_routed_init_chosen_abstain,
  mbc_arrow_abstain (behind a DLP router trained for the cluster library, as `loramux router train`
  does for any library); and with the multi-task LoRA as the library's general adapter, serving
  what they abstain on (`loramux library general`): dlp_general, dlp_soft_abstain_general,
  arrow_abstain_general, arrow_gks_abstain_general, mole_routed_abstain_general,
  mole_routed_init_abstain_general, mole_route_start_abstain_general. That library
  (<library>-general) holds the same adapters, DLP router and gates, copied.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from composite import (RESULTS, common_args, ensure_dlp, ensure_library, ensure_mbc, ensure_merges, ensure_mole,
                       copy_routers, ensure_multitask, gate_info, gate_stamp, gates_changed, library_sha, log,
                       superseded_key)
from routing_real import UNSEEN

from loramux import Library, LoraTrainConfig, load_base, load_tasks
from loramux._atomic import atomic_write_bytes
from loramux.bench.machine import machine
from loramux.data.fetch import fetch_bigbench
from loramux.evaluation.harness import EvalConfig, evaluate
from loramux.evaluation.stats import paired_bootstrap
from loramux.fusion import FusedModel

# strategy -> what the harness runs, and over which library ("lib": the private library; else a side one)
STRATEGIES = {"base": ("base", "lib"), "uniform": ("uniform", "lib"), "dlp": ("dlp", "lib"),
              "dlp_soft": ("dlp_p0.9_open", "lib"), "arrow": ("arrow", "lib"),
              "arrow_gks": ("arrow_gks", "lib"), "mole": ("mole:mole_layer", "lib"),
              "mole_pooled": ("mole:mole_layer_pooled", "lib"), "mole_routed": ("mole:mole_layer_routed", "lib"),
              "ties": ("oracle", "ties"), "multitask": ("oracle", "multitask"), "mbc_arrow": ("arrow", "mbc"),
              # the same routers behind the library's DLP out-of-library test (routers/abstention.py)
              "dlp_soft_abstain": ("dlp_p0.9", "lib"), "arrow_abstain": ("arrow_abstain", "lib"),
              "arrow_gks_abstain": ("arrow_gks_abstain", "lib"),
              "mole_routed_abstain": ("mole_abstain:mole_layer_routed", "lib"),
              "mbc_arrow_abstain": ("arrow_abstain", "mbc"),  # the MBC library's own DLP router's test
              # the same, over the library with the multi-task LoRA named its general adapter: what a
              # router abstains on goes to that LoRA instead of the base model (library.py)
              "dlp_general": ("dlp", "general"), "dlp_soft_abstain_general": ("dlp_p0.9", "general"),
              "arrow_abstain_general": ("arrow_abstain", "general"), "arrow_gks_abstain_general": ("arrow_gks_abstain", "general"),
              "mole_routed_abstain_general": ("mole_abstain:mole_layer_routed", "general"),
              # gates fitted to route before training (composite.py's mole_layer_routed_init)
              "mole_routed_init": ("mole:mole_layer_routed_init", "lib"),
              "mole_routed_init_abstain": ("mole_abstain:mole_layer_routed_init", "lib"),
              "mole_routed_init_abstain_general": ("mole_abstain:mole_layer_routed_init", "general"),
              # an ablation: that start alone, no training after it (composite.py's mole_layer_route_start)
              "mole_route_start": ("mole:mole_layer_route_start", "lib"),
              "mole_route_start_abstain": ("mole_abstain:mole_layer_route_start", "lib"),
              "mole_route_start_abstain_general": ("mole_abstain:mole_layer_route_start", "general"),
              # the routing start or the trained gates, whichever the sharpened validation loss keeps
              # (composite.py's mole_layer_routed_init_chosen; mole.py --calibrate-sharpen trains it)
              "mole_routed_init_chosen": ("mole:mole_layer_routed_init_chosen", "lib"),
              "mole_routed_init_chosen_abstain": ("mole_abstain:mole_layer_routed_init_chosen", "lib")}


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--unseen-dir", default=None, help="default: $LORAMUX_HOME/data/unseen (fetched if missing)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--mole-steps", type=int, default=400, help="at most (validation stops it)")
    ap.add_argument("--multitask-steps", type=int, default=0, help="0: the library's total steps")
    ap.add_argument("--mbc-k", type=int, default=5)
    ap.add_argument("--output", default=str(RESULTS / "unseen.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path, loramux_home, prediction_cache_path

    wanted = [s for s in args.strategies.split(",") if s]
    if set(wanted) - set(STRATEGIES):
        raise SystemExit(f"--strategies {sorted(set(wanted) - set(STRATEGIES))}: unknown; choose from "
                         f"{', '.join(STRATEGIES)}")
    unseen_dir = Path(args.unseen_dir or loramux_home() / "data" / "unseen")
    missing = [t for t in UNSEEN if not (unseen_dir / t / "test.json").is_file()]
    if missing:
        log(f"fetching {missing}")
        fetch_bigbench(missing, unseen_dir)
    test = load_tasks(str(unseen_dir), list(UNSEEN), "test")
    base = load_base(args.model) if args.model else load_base()
    tasks = args.tasks.split(",") if args.tasks else sorted(p.name for p in Path(args.data_dir).iterdir() if p.is_dir())
    out = Path(args.output)
    result = json.loads(out.read_text()) if out.is_file() else {}
    recipe = {"model": base.fingerprint, "library_tasks": tasks, "adapter": LoraTrainConfig().to_dict(),
              "unseen": {t.name: len(t) for t in test}, "limit_per_task": args.limit_per_task, "seed": args.seed,
              "multitask_steps": args.multitask_steps, "mbc_k": args.mbc_k}
    # --mole-steps is a cap, not a recipe: the gates stop when their validation curve is flat, and
    # each MoLE row records how far they trained (`mole_training`); files written before kept it here
    stored = {k: v for k, v in (result.get("recipe") or {}).items() if k != "mole_steps"}
    if stored != recipe:
        result = {"recipe": recipe, "per_task": {}, "average": {}, "library_sha": {}}
    result["recipe"] = recipe
    timings: dict = result.setdefault("train_seconds", {})
    lib = Library(Path(args.library or default_library_path()), create=True)
    if any(STRATEGIES[s][1] != "multitask" for s in wanted if s not in result["average"]):
        ensure_library(base, lib, args.data_dir, tasks)  # the multi-task LoRA alone needs none (a session's worth less)
    work = Library(lib.path.with_name(lib.path.name + "-baselines"), create=True)
    config = EvalConfig((), args.limit_per_task, args.seed, cache_dir=str(prediction_cache_path()))
    started = time.perf_counter()
    for s in wanted:
        if s in result["average"] and not gates_since(result, s, lib):
            continue
        harness, where = STRATEGIES[s]
        if s.startswith("dlp") or "_abstain" in s:
            ensure_dlp(lib, args.data_dir, timings)
        if s.startswith("mole"):  # these gates only (composite.py's MOLE names them)
            gates = harness.split(":")[1]
            ensure_mole(base, lib, args.data_dir, args.mole_steps, timings, names=(gates,))
            info = gate_info(lib, gates)
            # gate_pool "prompt": pooled as at inference in training; None (or absent, in rows written
            # before the stamp): over the prompt and the answer
            kept = ("steps_run", "stopped", "best_step", "best_val_task_loss", "kept_by")
            result.setdefault("mole_training", {})[s] = {"cap": (info.get("train_config") or {}).get("steps"),
                                                         **{k: info.get(k) for k in kept}, **gate_stamp(lib, gates)}
        if where == "lib":
            side = lib
        elif where == "general":
            result["multitask_steps_used"] = ensure_multitask(base, lib, work, args.data_dir, args.multitask_steps,
                                                              tasks=tasks)
            side = ensure_general(base, lib, work)
        elif where == "mbc":
            from loramux.library.clustering import Clustering

            committed = RESULTS / f"mbc_k{args.mbc_k}" / "clustering.json"
            side, _ = ensure_mbc(base, lib, args.data_dir, args.mbc_k,
                                 clustering=Clustering.load(committed) if committed.is_file() else None)
            if "_abstain" in s:  # a DLP router over the cluster adapters, with its out-of-library test
                ensure_dlp(side, args.data_dir, result.setdefault("mbc_dlp_seconds", {}))
        else:  # a merge or the multi-task LoRA, alone, from the side library
            if where == "multitask":
                result["multitask_steps_used"] = ensure_multitask(base, lib, work, args.data_dir, args.multitask_steps,
                                                                      tasks=tasks)
            else:
                ensure_merges(base, lib, work, timings)
            side = Library(Path(tempfile.mkdtemp()) / "one", create=True)
            side.add(where, work.adapter_dir(where), base=base, tasks=tuple(t.name for t in test))
        fused = FusedModel(base)
        r = evaluate(fused, side, test, dataclasses.replace(config, strategies=(harness,)), log=log)
        fused.unfuse()
        row = r["strategies"][harness]
        result["per_task"][s], result["average"][s] = row["per_task"], row["average"]
        result.setdefault("correct", {})[s] = r["correct"][harness]
        result["versus"] = versus(result)
        result["library_sha"][s] = (library_sha(lib) if where == "lib" else general_sha(lib, work) if where == "general"
                                    else library_sha(side))
        result.setdefault("commands", {})[s] = "python " + " ".join(sys.argv)  # rows span runs
        if harness in r.get("routing", {}):
            result.setdefault("routing", {})[s] = {"abstained": r["routing"][harness].get("abstained"),
                                                   "mean_adapters": r["routing"][harness].get("mean_adapters")}
        elif harness in r.get("abstained", {}):  # an in-forward router behind the out-of-library test
            result.setdefault("routing", {})[s] = {"abstained": r["abstained"][harness], "mean_adapters": None}
        result.update(metric=row["metric"], n_per_task=r["n_per_task"], command="python " + " ".join(sys.argv),
                      date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                      missing=[x for x in wanted if x not in result["average"]],
                      not_scored=[x for x in STRATEGIES if x not in result["average"]])
        log(f"{s}: average {row['average']:.4f}")
        save(out, result, wanted)
    result["wall_seconds_last_run"] = round(time.perf_counter() - started, 1)
    save(out, result, wanted)


def ensure_general(base, lib: Library, work: Library) -> Library:
    """<library>-general: the library's adapters, its DLP router and MoLE gates (copied, so they
    decide exactly as there) and the multi-task LoRA, named the general adapter. An adapter is
    copied again only when its source changed: `copied-from.json` keeps the source files' sha256
    (Library.add writes the weights anew, so the copy's own sha256 need not equal the source's).
    The routers are copied every time (they are small); one no longer usable in the source goes."""
    side = Library(lib.path.with_name(lib.path.name + "-general"), create=True)
    record = side.path / "copied-from.json"
    copied = json.loads(record.read_text()) if record.is_file() else {}
    wanted = {n: (lib, lib.get(n)) for n in lib.routable()} | {"multitask": (work, work.get("multitask"))}
    for name, (src, spec) in wanted.items():
        if name not in side or copied.get(name) != spec.files:
            side.add(name, src.adapter_dir(name), base=base, tasks=spec.tasks, training=spec.training,
                     replace=name in side)
            copied[name] = spec.files
            atomic_write_bytes(record, json.dumps(copied, indent=1, sort_keys=True).encode())
    for name in set(side.names()) - set(wanted):
        side.remove(name)
    side.set_general("multitask")
    copy_routers(lib, side)
    return side


def general_sha(lib: Library, work: Library) -> str:
    """What a `*_general` row was scored with: the library's adapters and the multi-task LoRA, as
    their sources record them (the side library's copies are written anew each time)."""
    return f"{library_sha(lib)}+multitask:{library_sha(work, ['multitask'])}"


def gates_since(result: dict, s: str, lib: Library) -> bool:
    """Whether row `s` scored MoLE gates that were since retrained, recalibrated (calibrate.py
    re-saves them) or saved again (composite.gates_changed); then its row moves to `superseded`
    to be scored anew."""
    gates = STRATEGIES[s][0].partition(":")[2]
    if not gates or s not in result.get("mole_training", {}) or gates not in lib.routers():
        return False  # rows are kept across library builds: gates not stored here leave the row as it is
    changed = gates_changed(result["mole_training"][s], gate_stamp(lib, gates))
    if not changed:
        return False
    tag, why = changed
    row = {k: result[k].pop(s) for k in ROW_KEYS if s in result.get(k, {})}
    row["minus_base"] = result.get("versus", {}).get("minus_base", {}).get(s)
    superseded = result.setdefault("superseded", {})
    superseded[superseded_key(superseded, s, tag)] = {"why": why, "row": row}
    log(f"{s}: {why}; scoring the row again")
    return True


ROW_KEYS = ("per_task", "average", "correct", "library_sha", "commands", "routing", "mole_training")


def save(out: Path, result: dict, wanted: list[str]) -> None:
    """Write the file, keeping the rows another run of the same recipe wrote since this one read it
    (two runs scoring different rows at once would otherwise each drop the other's)."""
    disk = json.loads(out.read_text()) if out.is_file() else {}
    if disk.get("recipe") == result["recipe"]:
        for s in set(disk.get("average", {})) - set(result["average"]):
            for key in ROW_KEYS:
                if s in disk.get(key, {}):
                    result.setdefault(key, {})[s] = disk[key][s]
        result["versus"] = versus(result)
        result["missing"] = [x for x in wanted if x not in result["average"]]
        result["not_scored"] = [x for x in STRATEGIES if x not in result["average"]]
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())


GENERAL = ("dlp_general", "dlp_soft_abstain_general", "arrow_abstain_general", "arrow_gks_abstain_general",
           "mole_routed_abstain_general", "mole_routed_init_abstain_general", "mole_route_start_abstain_general")
ROUTED = ("dlp", "dlp_soft", "arrow", "arrow_gks", "mbc_arrow", "mole", "mole_pooled", "mole_routed",
          "dlp_soft_abstain", "arrow_abstain", "arrow_gks_abstain", "mole_routed_abstain", "mbc_arrow_abstain",
          "mole_routed_init", "mole_routed_init_abstain", "mole_route_start", "mole_route_start_abstain",
          "mole_routed_init_chosen", "mole_routed_init_chosen_abstain", *GENERAL)
# what the server runs for each router by default over a library whose DLP router stores a test:
# DLP abstains by it at any top-p, and it stands in front of Arrow and MoLE (routers/abstention.py);
# over the library that names a general adapter, the same routers with it serving abstentions.
# The MBC cluster library is served with the test once a DLP router is trained for it (mbc_arrow_abstain).
AS_SERVED = ("dlp", "dlp_soft_abstain", "arrow_abstain", "arrow_gks_abstain", "mole_routed_abstain",
             "mbc_arrow_abstain", "mole_routed_init_abstain", "mole_route_start_abstain",
             "mole_routed_init_chosen_abstain", *GENERAL)
# gate sets run after their recipe's results were seen: they count against do-no-harm (a library
# stores and serves them like any other) but never as the best routed strategy
ABLATIONS = ("mole_route_start", "mole_route_start_abstain", "mole_route_start_abstain_general")


def versus(result: dict) -> dict:
    """Each scored strategy against base and against the multi-task LoRA: the difference of the
    averages in points with its paired, per-task stratified bootstrap interval (stats.py), on the
    same prompts; and the issue's two goals read off the point estimates."""
    correct = result.get("correct", {})
    out: dict = {}
    if set((result.get("metric") or {}).values()) - {"multiple_choice_grade", "exact_str_match"}:
        return {"skipped": "a task's score is not the share of prompts right (BLEU/ROUGE): no paired comparison"}
    for ref in ("base", "multitask"):
        if ref in correct:
            out[f"minus_{ref}"] = {s: paired_bootstrap(c, correct[ref]) for s, c in correct.items() if s != ref}
    if "minus_base" in out:
        vs = out["minus_base"]
        routed = {s: vs[s]["difference"] for s in ROUTED if s in vs}
        chosen = {s: d for s, d in routed.items() if s not in ABLATIONS}
        best = max(chosen, key=chosen.get) if chosen else None
        out["goals"] = {"do_no_harm_min_points": -0.5, "best_routed_min_points": 2.0,
                        "routers_below_base_minus_0.5": sorted(s for s in routed if routed[s] < -0.5),
                        "as_served_below_base_minus_0.5": sorted(s for s in AS_SERVED
                                                                 if s in routed and routed[s] < -0.5),
                        "as_served": [s for s in AS_SERVED if s in routed],
                        "best_routed": best, "best_routed_points": routed.get(best),
                        "ablations_not_best": [s for s in ABLATIONS if s in routed],
                        "how": "point estimates of strategy minus base on the same prompts; each interval in "
                               "minus_base says how much of the difference the prompts resolve"}
    return out


if __name__ == "__main__":
    main()
