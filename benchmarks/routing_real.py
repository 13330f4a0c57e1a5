"""Routing for real traffic: the DLP router across prompt formats, on tasks outside its library,
and while the library grows. Writes benchmarks/results/routing_real.json.

    python benchmarks/routing_real.py [--data-dir ../shared/data/bigbench] [--library L]

- formats: top-1 accuracy of the router (trained with format augmentation, defaults) on every
  in-library test prompt in three formats: its task's own template, a template no training prompt
  had (`other_template`), and its raw content. Abstention is off for this number (it measures
  which adapter ranks first); the share the stored threshold would abstain on is reported beside it.
- abstention: the energy score's AUROC, in-library test prompts vs the test prompts of 8 BIG-bench
  tasks outside the library (fetched with `loramux data fetch bigbench`, never committed; no
  adapter, threshold or training step saw them), of the stored test's decision score; the share
  of those abstained where 95% of in-library test prompts are kept, and at the stored per-adapter
  thresholds (each set at 95% recall on that adapter's validation prompts).
- composite_drop_points: what abstention costs on the in-library composite. With a trained library
  (--library) it is measured: the composite (harness, --limit-per-task prompts per task) routed
  by this router with abstention on, and off. Without one it is bounded, not measured.
- arrow / mole (with --library; mole only where the library stores gates named mole_layer): the
  analogous out-of-library score of the in-forward routers, and its AUROC on the same prompts:
  Arrow's mean over tokens and modules of the best |cos(h, prototype)|, MoLE's mean over units of
  the largest gate weight (low = no adapter fits).
- in_forward_routers.behind_dlp_test (with --only behind_test): what the DLP router's out-of-library test costs
  Arrow and the routed MoLE gates (mole_layer_routed, mole_layer_routed_init, the ablation
  mole_layer_route_start) in front of them (routers/abstention.py):
  the in-library composite with the test on (arrow_abstain, mole_abstain) and off, and how many
  in-library prompts it sent to the base model. What it gains outside the library is unseen.py's.
- in_forward_routers.mole_formats (with --only mole_formats --gates NAME): the stored gates on
  the in-library test prompts (--limit-per-task a task) in the three formats above: the share of
  (prompt, gate) pairs whose largest weight is on the prompt's own adapter, and that adapter's mean
  weight. Gates fitted to route (route_init.py) saw the tasks' own templates alone.
- growth_seconds: adding a 15th adapter to the library and retraining the router's head from
  cached embeddings (warm-started), then loading the new router beside the running one.

The router needs each adapter's tasks, not its weights: without --library, 14 random r=8 LoRAs
named after the tasks stand in (their weights never enter a routing decision).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import Library, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.bench.speed import random_adapter
from loramux.data.fetch import fetch_bigbench
from loramux.routers.sentence import DlpRouter, DlpTrainConfig, energy, render, train_dlp

RESULTS = Path(__file__).parent / "results"
UNSEEN = ("snarks", "ruin_names", "movie_recommendation", "anachronisms", "emoji_movie", "analogical_similarity",
          "metaphor_boolean", "fantasy_reasoning")
NEW_TASK = "snarks"  # the 15th adapter's task (one of the unseen ones: it is in the library only for growth)


def log(msg: str) -> None:
    print(f"[routing_real] {msg}", file=sys.stderr, flush=True)


def stand_in(base, lib: Library, name: str, seed: int) -> None:
    """A random r=8 LoRA on all seven projections (the serving benchmark's stand-ins), named after its task."""
    lib.add(name, random_adapter(base, 8, seed), base=base, tasks=(name,))


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0] * len(inside) + [1] * len(outside), torch.cat([inside, outside]).numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--unseen-dir", default=None, help="default: $LORAMUX_HOME/data/unseen (fetched if missing)")
    ap.add_argument("--library", default=None, help="a library with one adapter per task, named after it (copied "
                                                    "first; default: stand-ins)")
    ap.add_argument("--limit-per-task", type=int, default=40, help="with --library: composite prompts per task, "
                                                                    "and prompts per task for Arrow/MoLE scores")
    ap.add_argument("--output", default=str(RESULTS / "routing_real.json"))
    ap.add_argument("--gates", default=None,
                    help="the stored gate set to measure: with --only mole_formats (default mole_layer_route_start), "
                         "and with --only in_forward (default mole_layer; another is kept under mole:NAME)")
    ap.add_argument("--only", choices=("in_forward", "behind_test", "mole_formats"), default=None,
                    help="in_forward: (re)measure only the Arrow/MoLE section (needs --library) and keep the rest "
                         "of --output as it is; the routers measured record this command and date. behind_test: only "
                         "the composite cost of the DLP test in front of Arrow and MoLE, likewise. mole_formats: "
                         "only the stored gates --gates on the in-library prompts in three formats, likewise")
    ap.add_argument("--routers", default="arrow,mole", help="with --only in_forward: which of arrow,mole to measure "
                                                           "(the others keep their rows)")
    args = ap.parse_args()
    if args.only and not args.library:
        ap.error(f"--only {args.only} needs --library (a trained library with gates)")

    from loramux._home import loramux_home

    unseen_dir = Path(args.unseen_dir or loramux_home() / "data" / "unseen")
    names = sorted(p.name for p in Path(args.data_dir).iterdir() if (p / "train.json").is_file())
    train, test = load_tasks(args.data_dir, names, "train"), load_tasks(args.data_dir, names, "test")
    unseen = None
    if args.only not in ("mole_formats", "behind_test"):  # those two read in-library prompts alone
        missing = [t for t in UNSEEN if not (unseen_dir / t / "test.json").is_file()]
        if missing:
            log(f"fetching {missing}")
            fetch_bigbench(missing, unseen_dir)
        unseen = load_tasks(str(unseen_dir), list(UNSEEN), "test")
    base = load_base()
    if args.only:  # read-only on the library: no copy needed
        stamp = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        result = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
        kept = result.get("in_forward_routers", {})
        if args.only == "mole_formats":
            gates = args.gates or "mole_layer_route_start"
            section = mole_formats(Library(Path(args.library)), base, test, args.limit_per_task, gates)
            result["in_forward_routers"] = {**kept, "mole_formats": {**kept.get("mole_formats", {}), gates: {
                **section, **stamp, "machine": machine()}}}
        elif args.only == "behind_test":
            section = behind_test_drop(Library(Path(args.library)), base, test, args.limit_per_task)
            section["superseded"] = superseded_gates(kept.get("behind_dlp_test", {}), section)
            result["in_forward_routers"] = {**kept, "behind_dlp_test": {**section, **stamp, "machine": machine()}}
        else:
            wanted = tuple(r for r in args.routers.split(",") if r)
            section = in_forward_scores(Library(Path(args.library)), base, test, unseen, args.limit_per_task, wanted,
                                        gates=args.gates or "mole_layer")
            measured = [k for k in section if k.split(":")[0] in wanted]
            result["in_forward_routers"] = {**kept, **section, **{r: {**section[r], **stamp} for r in measured}}
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote the in_forward_routers section of {args.output}")
        return
    work = Path(tempfile.mkdtemp(prefix="routing_real-"))
    if args.library:  # a copy: the growth step adds an adapter and a router to it
        import shutil

        lib = Library(shutil.copytree(args.library, work / "library"))
    else:
        lib = Library(work / "library", create=True)
        for i, t in enumerate(names):
            stand_in(base, lib, t, seed=i)
    config = DlpTrainConfig()
    started = time.perf_counter()
    router = train_dlp(lib, train, config, progress=False, log=log)
    train_seconds = time.perf_counter() - started
    router.save(lib)
    out: dict = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine(), "library": "given" if args.library else "stand-ins (14 random r=8 LoRAs)",
                 "router": {"train_config": router.info["train_config"], "train_seconds": round(train_seconds, 1),
                            "val_accuracy": router.info["val_accuracy"], "abstain": dataclasses.asdict(router.abstain)},
                 "n_test": {t.name: len(t) for t in test}, "n_unseen": {t.name: len(t) for t in unseen}}

    def scored(tasks, fmt):
        texts = [render(ex, fmt) for t in tasks for ex in t.examples]
        logits, _ = router.logits(texts, cache=True)
        return logits, torch.tensor([k for k, t in enumerate(tasks) for _ in t.examples])

    index = {a: i for i, a in enumerate(router.adapters)}

    def margin(logits: torch.Tensor) -> torch.Tensor:
        """The stored test's decision score: energy minus the threshold of the adapter ranked first (> 0: abstain)."""
        limits = torch.tensor([router.abstain.limit(a) for a in router.adapters])
        return energy(logits) - limits[logits.argmax(-1)]

    formats, inside, inside_energy = {}, {}, {}
    for fmt in ("own", "other_template", "raw"):
        logits, y = scored(test, fmt)
        y = torch.tensor([index[test[k].name] for k in y.tolist()])
        hit = logits.argmax(-1) == y
        inside[fmt], inside_energy[fmt] = margin(logits), energy(logits)
        formats[fmt] = {
            "top1": round(float(hit.float().mean()), 4),
            "top1_per_task": {t.name: round(float(hit[y == index[t.name]].float().mean()), 4) for t in test},
            "abstained_at_stored_thresholds": round(float((inside[fmt] > 0).float().mean()), 4)}
        log(f"format {fmt}: top-1 {formats[fmt]['top1']:.4f}")
    out["formats"] = {k: v["top1"] for k, v in formats.items()}
    out["formats_detail"] = formats

    abst: dict = {"score": "energy minus the threshold of the adapter ranked first (per-adapter thresholds, each at "
                           f"{router.abstain.recall:.0%} of that adapter's validation prompts)",
                  "threshold_recall_on_validation": router.abstain.recall}
    per_format = {}
    for fmt in ("own", "raw"):
        u_logits, u_y = scored(unseen, fmt)
        u = margin(u_logits)
        at95 = torch.quantile(inside[fmt], 0.95)  # the point of the curve where 95% of in-library test prompts are kept
        per_format[fmt] = {
            "auroc": round(auroc(inside[fmt], u), 4),
            "auroc_energy_alone": round(auroc(inside_energy[fmt], energy(u_logits)), 4),
            "out_of_library_abstained_at_95_recall": round(float((u > at95).float().mean()), 4),
            "in_library_recall_at_stored_thresholds": round(float((inside[fmt] <= 0).float().mean()), 4),
            "out_of_library_abstained_at_stored_thresholds": round(float((u > 0).float().mean()), 4),
            "abstained_per_unseen_task_at_stored_thresholds": {
                t.name: round(float((u[u_y == k] > 0).float().mean()), 4) for k, t in enumerate(unseen)}}
        log(f"abstention ({fmt} format): {per_format[fmt]}")
    abst["per_format"] = per_format
    abst["auroc"] = per_format["own"]["auroc"]
    abst["abstain_rate_at_95_recall"] = per_format["own"]["out_of_library_abstained_at_95_recall"]
    abst["abstain_rate_at_95_recall_note"] = (
        "a point of the ROC curve: the cut-off that keeps 95% of the in-library *test* prompts, for reporting only; "
        "what a served router does is the stored thresholds' row (set on validation prompts alone)")
    # Abstaining on an in-library prompt serves it with the base model: it loses at most that prompt's
    # score (in [0, 1]), so the composite (mean over tasks of mean over prompts) drops by at most the
    # mean per-task abstained share. The estimate assumes abstained prompts gain what their task's
    # prompts gain on average (composite.json: dlp_p0.6 - base per task).
    comp = json.loads((RESULTS / "composite.json").read_text())["strategies"]
    owner = torch.tensor([index[x.name] for x in test for _ in x.examples])
    shares = {t.name: float((inside["own"][owner == index[t.name]] > 0).float().mean()) for t in test}
    gain = {t: comp["dlp_p0.6"]["per_task"][t] - comp["base"]["per_task"][t] for t in shares}
    abst["composite_drop_points"] = {
        "upper_bound": round(100 * sum(shares.values()) / len(shares), 2),
        "estimate": round(100 * sum(shares[t] * max(0.0, gain[t]) for t in shares) / len(shares), 2),
        "measured": None,
        "how": "upper bound = mean per-task abstained share of the in-library test prompts (own format, stored "
               "thresholds) x 100; estimate = the same shares x each task's dlp_p0.6 - base gain in composite.json. "
               + ("'measured' is the composite itself (how_measured)." if args.library else
                  "No trained library given: not a measured composite."),
        "abstained_share_per_task": {t: round(v, 4) for t, v in shares.items()}}
    if args.library:
        abst["composite_drop_points"].update(measured_drop(lib, base, test, args.limit_per_task))
        out["in_forward_routers"] = in_forward_scores(lib, base, test, unseen, args.limit_per_task)
    out["abstention"] = abst

    # Growth: a 15th adapter, then the router retrained from cached embeddings, warm-started.
    new = load_tasks(str(unseen_dir), [NEW_TASK], "train")
    encoded: list[str] = []
    real_encode = router.encoder.encode
    router.encoder.encode = lambda texts, **kw: encoded.extend(texts) or real_encode(texts, **kw)
    started = time.perf_counter()
    stand_in(base, lib, NEW_TASK, seed=99)
    added = time.perf_counter()
    grown = train_dlp(lib, train + new, config, progress=False, log=log, previous=router)
    grown.save(lib)
    trained = time.perf_counter()
    live = DlpRouter.load(lib, encoder=router.encoder)  # what a running server does: head and threshold only
    loaded = time.perf_counter()
    probe = [render(ex, "own") for ex in load_tasks(str(unseen_dir), [NEW_TASK], "test")[0].examples]
    routed = [r.adapters[0] if r.adapters else None for r in live.route(probe, abstain=False)]
    out["growth_seconds"] = round(loaded - started, 1)  # the first training's time includes whatever it encoded
    out["growth"] = {"add_adapter_s": round(added - started, 1), "retrain_head_s": round(trained - added, 1),
                     "load_new_router_s": round(loaded - trained, 1), "warm_start": grown.info["warm_start"],
                     "prompts_encoded": len(encoded), "prompts_in_training": grown.info["n_train"] + grown.info["n_val"],
                     "new_task": NEW_TASK, "new_task_test_top1": round(routed.count(NEW_TASK) / len(routed), 4),
                     "first_train_seconds_for_comparison": round(train_seconds, 1),
                     "first_train_note": "this run's 14-adapter training; its embeddings may come from the cache of "
                                         "an earlier run (then it is not a cold time)",
                     "how": "library.add of a stand-in adapter + train_dlp(previous=old router): the 14 tasks' "
                            "embeddings come from the on-disk cache filled by the first training (which is what "
                            "'from cached embeddings' means); only the new task's prompts are encoded"}
    log(f"growth: {out['growth']}")
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.output}")


def measured_drop(lib: Library, base, test, limit: int) -> dict:
    """The in-library composite routed by the stored DLP router with abstention on and off."""
    from loramux._home import prediction_cache_path
    from loramux.evaluation.harness import EvalConfig, evaluate
    from loramux.fusion import FusedModel

    fused = FusedModel(base)
    r = evaluate(fused, lib, test, EvalConfig(("base", "dlp", "dlp_open"), limit, 0,
                                              cache_dir=str(prediction_cache_path())), log=log)
    fused.unfuse()
    on, off = r["strategies"]["dlp"]["average"], r["strategies"]["dlp_open"]["average"]
    return {"measured": round(100 * (off - on), 2), "composite_abstain_on": on, "composite_abstain_off": off,
            "composite_base": r["strategies"]["base"]["average"], "limit_per_task": limit,
            "abstained_in_library": r.get("routing", {}).get("dlp", {}).get("abstained"),
            "how_measured": f"harness composite ({limit} seeded test prompts per task, the library's trained "
                            f"adapters): the same router with abstention on (dlp) and off (dlp_open); "
                            f"measured = off - on, in points"}


def superseded_gates(before: dict, now: dict) -> dict:
    """The earlier run's superseded rows, and its MoLE rows whose gates were retrained, recalibrated
    or saved again since (composite.gates_changed): numbers of other gates are kept, not
    overwritten. A row from before the gates were stamped carries only a sharpening; it is kept
    as `unstamped` when its numbers changed, and is replaced unmarked when retrained gates happen
    to score the same."""
    from composite import gates_changed, superseded_key

    out = dict(before.get("superseded", {}))
    for name, row in now.items():
        was = before.get(name)
        if not (isinstance(row, dict) and "sharpen" in row and was):  # MoLE rows alone carry a stamp
            continue
        changed = gates_changed(was, row)
        tag = changed[0] if changed else (None if "gates_dir" in was or was.get("composite_test_off")
                                          == row["composite_test_off"] else "unstamped")
        if tag:
            out[superseded_key(out, name, tag)] = {**was, "command": before.get("command"),
                                                   "date": before.get("date")}
    return out


def behind_test_drop(lib: Library, base, test, limit: int) -> dict:
    """The in-library composite of Arrow and of the routed MoLE gates with the library's DLP
    out-of-library test in front of them, and without."""
    from loramux._home import prediction_cache_path
    from loramux.evaluation.harness import EvalConfig, evaluate
    from loramux.fusion import FusedModel

    pairs = {"arrow": ("arrow", "arrow_abstain"),
             "mole_routed": ("mole:mole_layer_routed", "mole_abstain:mole_layer_routed"),
             "mole_routed_init": ("mole:mole_layer_routed_init", "mole_abstain:mole_layer_routed_init"),
             "mole_route_start": ("mole:mole_layer_route_start", "mole_abstain:mole_layer_route_start")}
    stored = lib.routers()  # gate sets this library does not hold are left out, not an error
    pairs = {k: p for k, p in pairs.items() if p[1].partition(":")[2] in ("", *stored)}
    fused = FusedModel(base)
    r = evaluate(fused, lib, test, EvalConfig(("base", *(s for pair in pairs.values() for s in pair)), limit, 0,
                                              cache_dir=str(prediction_cache_path())), log=log)
    fused.unfuse()
    avg = {s: v["average"] for s, v in r["strategies"].items()}
    out: dict = {"composite_base": avg["base"], "limit_per_task": limit,
                 "how": f"harness composite ({limit} seeded test prompts per task, the library's trained adapters "
                        f"and gates): each in-forward router with the stored DLP out-of-library test in front "
                        f"(prompts it rejects go to the base model) and without; drop_points = off - on"}
    from composite import gate_stamp

    for name, (off, on) in pairs.items():
        gates = on.partition(":")[2]
        out[name] = {**(gate_stamp(lib, gates) if gates else {}), "composite_test_off": avg[off], "composite_test_on": avg[on],
                     "drop_points": round(100 * (avg[off] - avg[on]), 2),
                     "abstained_in_library": r["abstained"][on],
                     "per_task_off": r["strategies"][off]["per_task"], "per_task_on": r["strategies"][on]["per_task"]}
        log(f"{name}: {out[name]['composite_test_off']} -> {out[name]['composite_test_on']}")
    return out


def _sample(tasks, limit: int) -> tuple[list[str], list[int]]:
    from loramux.evaluation.harness import sample_indices

    idx = sample_indices(tasks, limit, 0)
    prompts = [t.examples[i].prompt for t in tasks for i in idx[t.name]]
    return prompts, [k for k, t in enumerate(tasks) for _ in idx[t.name]]


def arrow_alignment(router, prompts: list[str], batch: int = 8) -> torch.Tensor:
    """Per prompt: the mean over its real tokens and Arrow's modules of max_i |cos(h, v_i)|."""
    sums: list[torch.Tensor] = []
    real = router.gate

    def gate(name, x, mask):
        if x.shape[1] > 1:
            P, ok = router.prototypes[name], router.valid[name]
            cos = (x @ P.T).abs() / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # prototypes are unit vectors
            best = cos.masked_fill(~ok, 0).amax(-1)  # (B, T)
            m = mask.to(best) if mask is not None and mask.shape == best.shape else torch.ones_like(best)
            sums.append((best * m).sum(1) / m.sum(1).clamp(min=1))
        return real(name, x, mask)

    router.gate = gate
    out = []
    try:
        for b in range(0, len(prompts), batch):
            sums.clear()
            with torch.no_grad():
                router.route(prompts[b:b + batch])
            out.append(torch.stack(sums).mean(0))
    finally:
        del router.gate
    return torch.cat(out)


def mole_confidence(router, prompts: list[str], batch: int = 8) -> torch.Tensor:
    """Per prompt: the mean over the gated units of the largest gate weight."""
    out = []
    for b in range(0, len(prompts), batch):
        with torch.no_grad():
            for r in router.route(prompts[b:b + batch]):
                out.append(sum(max(w.values()) for w in r.layers.values()) / len(r.layers))
    return torch.tensor(out)


def mole_formats(lib: Library, base, test, limit: int, name: str, batch: int = 8) -> dict:
    """The stored gates `name` on in-library test prompts rendered in each format: the share of
    (prompt, gate) pairs whose largest weight is on the prompt's own adapter, and its mean weight."""
    from loramux.evaluation.harness import sample_indices
    from loramux.fusion import FusedModel
    from loramux.routers import load_router
    from loramux.routers.gating import task_owners

    owners = task_owners(lib)
    if not any(t.name in owners for t in test):
        raise SystemExit("--only mole_formats: no test task has an own adapter in the library")
    fused = FusedModel(base)
    router = load_router(lib, "mole", fused=fused, name=name)
    idx = sample_indices(test, limit, 0)
    result: dict = {"what": "share of (prompt, gate) pairs whose largest weight is on the prompt's own adapter "
                            "(own_top), and the own adapter's weight averaged over gates and prompts (own_weight)",
                    "sharpen": router.info.get("sharpen"), "n": sum(len(idx[t.name]) for t in test if t.name in owners)}
    for fmt in ("own", "other_template", "raw"):
        per_task = {}
        for t in test:
            own = owners.get(t.name)
            if own is None:
                continue
            prompts = [render(t.examples[i], fmt) for i in idx[t.name]]
            top, weight = [], []
            for b in range(0, len(prompts), batch):
                with torch.no_grad():
                    for r in router.route(prompts[b:b + batch]):
                        units = list(r.layers.values())
                        # on top: strictly above every other adapter (the weights are rounded to 4
                        # decimals, so a near-uniform gate's tie is a miss, not the first adapter's win)
                        top.append(sum(w[own] > max(v for a, v in w.items() if a != own) for w in units) / len(units))
                        weight.append(sum(w.get(own, 0.0) for w in units) / len(units))
            per_task[t.name] = {"own_top": round(sum(top) / len(top), 4), "own_weight": round(sum(weight) / len(weight), 4)}
        result[fmt] = {k: round(sum(v[k] for v in per_task.values()) / len(per_task), 4) for k in ("own_top", "own_weight")}
        result[fmt]["per_task"] = per_task
        log(f"mole_formats {name} {fmt}: {result[fmt]['own_top']} own top, {result[fmt]['own_weight']} own weight")
    fused.unfuse()
    return result


def in_forward_scores(lib: Library, base, test, unseen, limit: int, routers=("arrow", "mole"),
                      gates: str = "mole_layer") -> dict:
    """AUROC of Arrow's and MoLE's own out-of-library scores (low confidence = outside); MoLE's
    of the stored gates `gates`, kept under "mole" for mole_layer and "mole:<gates>" otherwise."""
    from loramux.fusion import FusedModel
    from loramux.routers import load_router

    inside, _ = _sample(test, limit)
    outside, out_y = _sample(unseen, limit)
    result = {"n_in_library": len(inside), "n_out_of_library": len(outside)}
    scorers = {"arrow": ("arrow", {}, arrow_alignment,
                         "mean over real tokens and modules of max_i |cos(h, prototype_i)|"),
               "mole": ("mole", {"name": gates}, mole_confidence,
                        "mean over the layer gates of the largest gate weight")}
    for which, (method, options, score, what) in scorers.items():
        if which not in routers:
            continue
        key = f"mole:{gates}" if which == "mole" and gates != "mole_layer" else which
        fused = FusedModel(base)
        try:
            router = load_router(lib, method, fused=fused, **options)
        except Exception as e:  # no stored gates: say so
            result[key] = {"not_measured": f"{type(e).__name__}: {e}"}
            fused.unfuse()
            continue
        a, b = score(router, inside), score(router, outside)
        fused.unfuse()
        result[key] = {"score": what, "auroc": round(auroc(-a, -b), 4),
                       "out_of_library_below_5th_percentile": round(float((b < torch.quantile(a, 0.05)).float().mean()), 4),
                       "mean_in_library": round(float(a.mean()), 4), "mean_out_of_library": round(float(b.mean()), 4),
                       "per_unseen_task_mean": {t.name: round(float(b[torch.tensor(out_y) == k].mean()), 4)
                                                for k, t in enumerate(unseen)}}
        log(f"{key}: {result[key]}")
    return result


if __name__ == "__main__":
    main()
