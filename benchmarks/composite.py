"""The composite benchmark: every strategy on every task's test set, mixed, through one scorer.

One command builds what is missing (cached under $LORAMUX_HOME, scored predictions included, so a warm run
reads its scores back and a killed run resumes where it stopped). Each strategy's row is written into
composite.json as soon as it is scored, with its recipe; a later run keeps every row whose recipe is
unchanged and computes only the rest, so a cold run longer than one session goes on from the committed
JSON even on a machine whose cache is gone (the extras then need no private library at all: MBC takes
the committed results/mbc_k<k>/clustering.json). Rows record the digest of the weights they used
(`library_sha`), and cost ratios per kind of mixture are kept from the run that measured them.
  - the private library: one LoRA per task with loramux's defaults (`loramux train`);
  - the DLP router; MoLE gates at layer and block granularity, layer without the balance loss,
    layer with the paper's balance pooled over all gates (loramux balances each gate on its own),
    and layer with loramux's routing term (mole_layer_routed; about an hour of this CPU per set);
  - static merges of all adapters with PEFT's `add_weighted_adapter` (TIES and DARE-TIES on each
    adapter's dW, density 0.5, weight 1, back to rank 8 x K);
  - a multi-task LoRA on the union of the tasks with the library's parameter count (rank 8 x K);
  - optional (--with mbc,dynamic): an MBC cluster library (k=5) routed by Arrow (mbc_arrow), and one
    Dynamic LoRA per task used as the oracle (dynamic_oracle). Each trains a whole library's worth
    of steps (about 70 minutes of this CPU each), cached beside the library.
then scores base, oracle, uniform, ties, dare, multitask, dlp_p{0.3,0.6,0.9,1.0}, mole_layer,
mole_block, mole_layer_no_balance, mole_layer_pooled, mole_layer_routed, arrow (and mbc_arrow, dynamic_oracle) with
`loramux.evaluation.harness`, on a seeded sample of each test set (--limit-per-task), and writes
benchmarks/results/composite.{json,md} plus PNGs (heatmap, DLP router confusion, top-p sweep,
accuracy vs cost).

    python benchmarks/composite.py --data-dir ../shared/data/bigbench [--limit-per-task 40]
        [--mole-steps 400] [--multitask-steps 120] [--with mbc,dynamic] [--mbc-k 5] [--model M --library L]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import Library, LoraTrainConfig, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.bench.speed import _median_times
from loramux.evaluation.harness import EvalConfig, evaluate, to_markdown
from loramux.evaluation.plots import plot_results
from loramux.fusion import FusedModel
from loramux.routers.gating.route_init import ROUTE_FIT
from loramux.training import train_adapters, train_lora

RESULTS = Path(__file__).parent / "results"
# name -> its MoleTrainConfig settings: balance over units is loramux's default, pooled the paper's
# (routers/gating/train.py says why they differ); a routing term β of 0 is the paper's objective, 1
# the answer loss's own weight; a routing start fits the gates to route before training (route_init.py)
MOLE = {"mole_layer": {"granularity": "layer"}, "mole_block": {"granularity": "block"},
        "mole_layer_no_balance": {"granularity": "layer", "balance_alpha": 0.0},
        "mole_layer_pooled": {"granularity": "layer", "balance_over": "pooled"},
        "mole_layer_routed": {"granularity": "layer", "route_alpha": 1.0},
        "mole_layer_routed_init": {"granularity": "layer", "route_alpha": 1.0, "route_init_per_task": 64},
        # the same recipe, trained again where mole.py --calibrate-sharpen weighs its start against
        # its kept gates (calibrate.py): a stored gate set no longer has its start (NEEDS_GRID)
        "mole_layer_routed_init_chosen": {"granularity": "layer", "route_alpha": 1.0, "route_init_per_task": 64},
        # an ablation: the routing start alone, no training after it (its own step count, whatever the cap)
        "mole_layer_route_start": {"granularity": "layer", "route_alpha": 1.0, "route_init_per_task": 64, "steps": 0},
        # the same start fitted on each prompt in four training formats (routers/sentence/formats.py), half
        # the prompts per task: gates that route the content, not only the template (routing_real.py
        # --only mole_formats measures them on a held-out template)
        "mole_layer_route_start_formats": {"granularity": "layer", "route_alpha": 1.0, "route_init_per_task": 32,
                                           "route_init_formats": ("own", "raw", "qa", "instruction"), "steps": 0}}

# gate sets trained only with a sharpening grid (mole.py --calibrate-sharpen), which chooses between
# their routing start and their kept gates before they are saved; left out of the default lists
NEEDS_GRID = ("mole_layer_routed_init_chosen",)
# gate sets run after their recipe's results were seen (the routing start alone, and fitted in
# several formats): reported, and marked so, beside the recipe they ablate
MOLE_ABLATIONS = ("mole_layer_route_start", "mole_layer_route_start_formats")
# why a row moved to `superseded`: the first kind may come back (restore), the second not
RECIPE_CHANGED = "its recipe changed since"
OTHER_BUILD = "scored on another build of the library; scored again (--rescore)"


def log(msg: str) -> None:
    print(f"[composite] {msg}", file=sys.stderr, flush=True)


def ensure_library(base, lib: Library, data_dir: str, tasks: list[str]) -> None:
    """The private library: one LoRA per task with loramux's defaults. A plain LoRA that
    benchmarks/dynamic_lora.py trained with exactly this recipe (its seed-0 `lora` rows, same data
    and config) is that adapter and is taken from <library>-dynamic instead of trained again."""
    todo = [t for t in tasks if t not in lib]
    ablation = lib.path.with_name(f"{lib.path.name}-dynamic")
    if todo and (ablation / "loramux-library.json").is_file():
        ablation, config = Library(ablation), LoraTrainConfig()
        for task in list(todo):
            donor = f"{task}-lora-s{config.seed}"
            if same_recipe(ablation, donor, load_tasks(data_dir, [task], "train"), config):
                log(f"{task}: dynamic_lora.py's {donor} has this recipe; reusing it")
                lib.add(task, ablation.adapter_dir(donor), base=base, tasks=(task,), training=ablation.get(donor).training)
                todo.remove(task)
    if todo:
        log(f"training {len(todo)} task adapters: {todo}")
        train_adapters(base, load_tasks(data_dir, todo, "train"), lib, LoraTrainConfig(), skip_existing=True, resume=True)


def ensure_dlp(lib: Library, data_dir: str, timings: dict) -> None:
    from loramux.routers.sentence import train_dlp

    try:  # a router stored before abstention existed has no thresholds: trained again
        if json.loads((lib.router_dir("dlp") / "router.json").read_text()).get("abstain") is not None:
            return
    except Exception:
        pass
    log("training the DLP router")
    started = time.perf_counter()
    tasks = load_tasks(data_dir, sorted({t for s in lib.list() for t in s.tasks}), "train")
    train_dlp(lib, tasks).save(lib)
    timings["dlp"] = round(time.perf_counter() - started, 1)


def mole_config(name: str, steps: int) -> dict:
    """The training recipe of the gate set `name` (MOLE), as stored with trained gates."""
    from loramux.routers.gating import MoleTrainConfig

    return dataclasses.asdict(MoleTrainConfig(**{"balance_alpha": 0.5, "balance_over": "units", "steps": steps,
                                                 **MOLE[name]}))


def same_gate_recipe(stored: dict, wanted: dict) -> bool:
    """Whether gates stored with `stored` (their router info) are what the recipe `wanted` trains.
    Gates stored before `balance_over` existed were trained pooled (the paper's form), before
    `route_alpha` without the routing term; without a balance loss (α = 0) where it is taken does
    not matter. Gates pooled over prompt and answer in training (stored without `gate_pool`, so
    before `route_init_per_task` existed too) are not what today's trainer gives. The step
    count is a cap: gates that stopped on a flat curve within this cap, or ran to exactly this
    cap, are the gates it trains. A routing start must be fitted as today's (`ROUTE_FIT`)."""
    if stored.get("gate_pool") != "prompt":
        return False
    wanted = json.loads(json.dumps(wanted))  # as stored: tuples read back as lists
    if wanted.get("route_init_per_task") and \
            ((stored.get("curve") or [{}])[0].get("route_init") or {}).get("fit") != ROUTE_FIT:
        return False  # a routing start fitted another way (route_init.py, ROUTE_FIT)
    config = {"balance_over": "pooled", "route_alpha": 0.0, "route_init_formats": ["own"],
              **(stored.get("train_config") or {})}
    if wanted["balance_alpha"] == 0:
        config, wanted = {**config, "balance_over": None}, {**wanted, "balance_over": None}
    if {**config, "steps": None} != {**wanted, "steps": None}:
        return False
    return config.get("steps") == wanted["steps"] or (stored.get("stopped") == "flat"
                                                       and (stored.get("steps_run") or 0) <= wanted["steps"])


def gate_info(lib: Library, name: str) -> dict:
    """The `info` stored with the gate set `name` (its train_config, curve, steps_run, ...)."""
    return json.loads((lib.router_dir(name) / "router.json").read_text()).get("info", {})


def gate_stamp(lib: Library, name: str) -> dict:
    """What a result row records of the gate set `name` it scored, to tell later whether the gates
    stored now are still those: the stored directory (the library writes a new one on every save,
    retraining or recalibrating), the sharpening, how training pooled the gates' inputs and how
    long it trained."""
    where = lib.router_dir(name)
    info = json.loads((where / "router.json").read_text()).get("info", {})
    return {"gates_dir": where.name, "sharpen": info.get("sharpen") or 1.0, "gate_pool": info.get("gate_pool"),
            "seconds": info.get("seconds")}


def gates_changed(was: dict, now: dict) -> tuple[str, str] | None:
    """(tag, why) when a row stamped `was` no longer describes the gates stamped `now` (gate_stamp):
    retrained, recalibrated or saved again; None when nothing it recorded changed. Rows written
    before the stamp carry part of it (a sharpening; in unseen.py also the training seconds), and
    only what a row carries is compared. The tag names the row among superseded ones
    (`superseded_key` keeps it unique)."""
    sharpen = was.get("sharpen") or 1.0
    then = was.get("gates_dir") or f"trained{was.get('seconds') or 0:g}s"
    if any(k in was and was[k] != now[k] for k in ("gate_pool", "seconds")):
        pool = {"prompt": "the prompt"}.get(was.get("gate_pool"), "the prompt and the answer")
        return then, (f"scored with gates since retrained (then: pooled over {pool} in training, "
                      f"{was.get('seconds')} s of training, logits x {sharpen:g})")
    if sharpen != now["sharpen"]:
        return (f"sharpen{sharpen:g}", f"scored with the gates' logits x {sharpen:g}; the gates were calibrated "
                                       f"to x {now['sharpen']:g} since")
    if "gates_dir" in was and was["gates_dir"] != now["gates_dir"]:
        return then, "scored with gates saved again since (the same training and sharpening)"
    return None


def superseded_key(rows: dict, name: str, tag: str) -> str:
    """`name@tag`, numbered when `rows` already holds it: a superseded row is never overwritten."""
    key, n = f"{name}@{tag}", 2
    while key in rows:
        key, n = f"{name}@{tag}#{n}", n + 1
    return key


def ensure_mole(base, lib: Library, data_dir: str, steps: int, timings: dict, names=tuple(MOLE),
                sharpen_grid: tuple[float, ...] = ()) -> list[str]:
    """Train the gate sets `names` that the library does not hold with today's recipe; with a
    sharpening grid, calibrate them before they are saved, as `loramux router train --sharpen-grid`
    does (a routing start is weighed against the kept gates only then: calibrate.py). Returns the
    names trained."""
    from loramux.routers.gating import CheckpointOtherRecipe, MoleTrainConfig, calibrate_sharpen, task_owners, train_mole

    tasks, trained = None, []

    def stored(name: str) -> bool:  # gates trained with this recipe (and so with a curve) are reused
        try:
            return same_gate_recipe(gate_info(lib, name), dataclasses.asdict(MoleTrainConfig(**mole_config(name, steps))))
        except Exception:
            return False
    names = [n for n in names if not stored(n)]
    if not sharpen_grid and (unready := [n for n in names if n in NEEDS_GRID]):
        raise SystemExit(f"{unready}: trained only with a sharpening grid (mole.py --calibrate-sharpen), which "
                         f"weighs their routing start against their kept gates before they are saved")
    for name in names:
        config = MoleTrainConfig(**mole_config(name, steps))
        tasks = tasks or load_tasks(data_dir, sorted({t for s in lib.routable_specs() for t in s.tasks}), "train")
        fused = FusedModel(base)
        for a in lib.routable():  # gates never cover the library's general adapter
            fused.load(lib, a)
        log(f"training {name} (at most {steps} steps, until the validation loss is flat)")
        owners = task_owners(lib)
        ckpt = lib.path.parent / "runs" / f"mole-{name}"  # a run cut short resumes at its last evaluation
        try:
            router = train_mole(fused, tasks, config, checkpoint_dir=ckpt, resume=True, owners=owners)
        except CheckpointOtherRecipe:
            shutil.rmtree(ckpt)
            router = train_mole(fused, tasks, config, checkpoint_dir=ckpt, owners=owners)
        if sharpen_grid:
            calibrate_sharpen(router, tasks, sharpen_grid, log=log)
        router.save(lib, name)
        timings[name] = router.info["seconds"]
        trained.append(name)
        fused.unfuse()
    return trained


# TIES and DARE as their papers define them: on each adapter's task vector dW = B A (PEFT's *_svd
# combination types; the plain ones merge A and B separately, which mixes unrelated factors), every
# adapter at weight 1 because TIES' disjoint merge already averages the agreeing entries (weights of
# 1/n on top shrank the merge n-fold, to the base model's score), back to the library's total rank so
# each merge has the library's (and the multi-task LoRA's) parameter count.
MERGE = {"weight": 1.0, "density": 0.5, "seed": 0}


def copy_routers(lib: Library, side: Library) -> None:
    """Store `lib`'s usable routers in `side` (a library holding the same adapters and more), and
    drop those of side's that `lib` no longer has or refuses."""
    entries, usable = lib.routers(), lib.usable_routers()
    for name, d in usable.items():
        side.save_router(name, entries[name]["kind"], list(entries[name]["adapters"]),
                         lambda dest, d=d: [shutil.copy2(f, dest / f.name) for f in d.iterdir()])
    for name in set(side.routers()) - set(usable):
        side.remove_router(name)


def ensure_merges(base, lib: Library, work: Library, timings: dict) -> None:
    """TIES and DARE-TIES merges of every adapter (PEFT), stored in a side library."""
    names = lib.names()
    total = sum(s.rank for s in lib.list())
    for kind, ctype in (("ties", "ties_svd"), ("dare", "dare_ties_svd")):
        rank = total
        if kind in work and work.get(kind).rank == rank:
            continue
        log(f"merging {len(names)} adapters with PEFT ({ctype}, rank {rank})")
        started = time.perf_counter()
        peft = lib.load_peft(base, names)
        # SVD cannot give more rank than a layer has (a tiny test model's 16-wide k_proj, say)
        rank = min([rank] + [min(m.in_features, m.out_features) for m in peft.modules() if hasattr(m, "lora_A")])
        torch.manual_seed(MERGE["seed"])  # DARE's random drop
        peft.add_weighted_adapter(names, [MERGE["weight"]] * len(names), kind, combination_type=ctype,
                                  density=MERGE["density"], svd_rank=rank)
        peft.set_adapter(kind)
        with tempfile.TemporaryDirectory() as tmp:
            peft.save_pretrained(tmp, selected_adapters=[kind])
            work.add(kind, Path(tmp) / kind, base=base, replace=kind in work)
        peft.unload()
        timings[kind] = round(time.perf_counter() - started, 1)


def ensure_multitask(base, lib: Library, work: Library, data_dir: str, steps: int,
                     tasks: list[str] | None = None) -> int:
    """One LoRA on the union of the tasks with the library's parameter count (the sum of its ranks);
    steps 0 = the library's total steps (matched compute). Checkpointed, so a killed run resumes.
    With `tasks` and a library not (yet) built, the same counts come from the recipe the library is
    trained with (one LoraTrainConfig() adapter per task), so this LoRA needs no library.
    Returns the steps it was trained with."""
    from loramux.training.build import default_checkpoint_dir

    specs = lib.list()
    names = sorted({t for s in specs for t in s.tasks})
    if tasks is not None and set(tasks) - set(names):  # the library's recipe, not its adapters
        names, default = sorted(tasks), LoraTrainConfig()
        total_steps, rank = default.steps * len(names), default.rank * len(names)
    else:
        total_steps = sum(s.training.steps if s.training else LoraTrainConfig.steps for s in specs)
        rank = sum(s.rank for s in specs)  # the library's parameter count in one LoRA
    steps = steps or total_steps
    if "multitask" in work and work.get("multitask").training.steps == steps:
        return steps
    log(f"training the multi-task LoRA (rank {rank}, {steps} steps)")
    tasks = load_tasks(data_dir, names, "train")
    config = LoraTrainConfig(rank=rank, alpha=2.0 * rank, steps=steps, warmup_steps=min(LoraTrainConfig.warmup_steps, steps))
    result = train_lora(base, tasks, config, checkpoint_dir=default_checkpoint_dir(work, f"multitask-{steps}"), resume=True)
    work.add("multitask", result.model, base=base, tasks=(), training=result.summary, replace="multitask" in work)
    result.model.unload()
    return steps


def ensure_mbc(base, lib: Library, data_dir: str, k: int, out_dir: Path | None = None,
               clustering=None) -> tuple[Library, object]:
    """MBC (ALGORITHMS.md §4): cluster the library's adapters into k groups by parameter similarity
    (or take a given `clustering` of k groups) and train one adapter per cluster on its tasks'
    union, with the members' total steps (so the cluster library costs what the private one did).
    Stored beside the library as <library>-mbc<k>, restartable per adapter and from checkpoints."""
    from loramux.library.clustering import ClusterConfig, cluster_adapters, save_clustering
    from loramux.training.build import cluster_plan

    if clustering is None:
        clustering = cluster_adapters(lib, ClusterConfig(k=k))
    elif clustering.config.k != k:
        raise ValueError(f"the given clustering was made with k={clustering.config.k}; MBC k={k} needs k={k}")
    if out_dir is not None:
        save_clustering(clustering, out_dir)
    side = Library(lib.path.with_name(f"{lib.path.name}-mbc{k}"), create=True)
    plan = cluster_plan(clustering, LoraTrainConfig())
    groups = [load_tasks(data_dir, task_names, "train") for _, task_names, _ in plan]
    names, configs = [p[0] for p in plan], [p[2] for p in plan]
    # A cluster trained before with this exact recipe (same tasks, data and config) is that adapter:
    # a one-task cluster is the private adapter, and a cluster that k=3 and k=5 share is trained once.
    donors = [lib] + [Library(p) for p in sorted(lib.path.parent.glob(f"{lib.path.name}-mbc*"))
                      if p != side.path and (p / "loramux-library.json").is_file()]
    for name, group, config in zip(names, groups, configs):
        if name in side:
            continue
        for donor in donors:
            found = next((s.name for s in donor.list() if same_recipe(donor, s.name, group, config)), None)
            if found is not None:
                log(f"MBC k={k}: {name} was trained with this recipe as {donor.path.name}/{found}; reusing it")
                side.add(name, donor.adapter_dir(found), base=base, tasks=tuple(t.name for t in group),
                         training=donor.get(found).training)
                break
    if any(n not in side for n in names):
        log(f"training the MBC k={k} cluster library: {clustering.members}")
    train_adapters(base, groups, side, configs, names=names, skip_existing=True, resume=True)
    return side, clustering


def ensure_dynamic_oracle(base, lib_path: Path, tasks: list[str], data_dir: str, timings: dict) -> Library:
    """One Dynamic LoRA per task with the private library's recipe (<library>-dynamic-oracle);
    an interrupted run keeps the adapters it finished. Needs no private library, only its recipe."""
    from loramux.training.dynamic import DynamicConfig, train_dynamic

    side = Library(lib_path.with_name(f"{lib_path.name}-dynamic-oracle"), create=True)
    ablation = lib_path.with_name(f"{lib_path.name}-dynamic")  # benchmarks/dynamic_lora.py's runs
    ablation = Library(ablation) if (ablation / "loramux-library.json").is_file() else None
    config, dyn = LoraTrainConfig(), DynamicConfig()
    for task in tasks:
        if task in side:
            continue
        seed0 = f"{task}-dynamic-s0"
        if ablation is not None and seed0 in ablation and same_dynamic_recipe(ablation.get(seed0), (task,), config, dyn):
            log(f"{task}: dynamic_lora.py's {seed0} has this recipe; reusing it")
            side.add(task, ablation.adapter_dir(seed0), base=base, tasks=(task,), training=ablation.get(seed0).training)
            continue
        log(f"training the Dynamic LoRA for {task}")
        result = train_dynamic(base, load_tasks(data_dir, [task], "train"), config, dyn)
        side.add(task, result.files, base=base, tasks=(task,), training=result.summary)
        timings.setdefault("dynamic_oracle", 0.0)
        timings["dynamic_oracle"] += result.summary.seconds
    return side


def same_recipe(lib: Library, name: str, tasks: list, config: LoraTrainConfig) -> bool:
    """Whether `lib`'s adapter `name` was trained by train_lora with exactly this config on these tasks."""
    if name not in lib:
        return False
    t = lib.get(name).training
    return (t is not None and t.config == config.to_dict()
            and t.data == ",".join(f"{task.name}({len(task)})" for task in tasks))


def same_dynamic_recipe(trained, tasks: tuple[str, ...], config: LoraTrainConfig, dyn) -> bool:
    """Whether `trained` (an AdapterSpec) is a Dynamic LoRA of these tasks with this config."""
    t = trained.training
    if t is None or tuple(trained.tasks) != tuple(tasks) or t.config.get("method") != "dynamic":
        return False
    stored = t.config.get("dynamic", {})
    return (all(t.config.get(k) == v for k, v in config.to_dict().items())
            and all(stored.get(k) == v for k, v in dataclasses.asdict(dyn).items()))


KIND = {"base": "base", "oracle": "oracle",
        "dynamic_oracle": "dynamic", "uniform": "uniform", "arrow": "arrow", "mbc_arrow": "arrow"}


def kind_of(strategy: str) -> str:
    """The kind of mixture a strategy runs, which is what its forward costs."""
    return KIND.get(strategy) or ("dlp" if strategy.startswith("dlp") else strategy)


def kind_ratios(base, lib: Library | None, dynamic: Library | None = None, reps: int = 3,
                fixed: Library | None = None) -> dict[str, float]:
    """Forward time of 8 x 96 tokens under each kind of mixture / the base forward, side by side:
    one adapter, the uniform mixture, DLP's two-adapter mixtures, Arrow and the stored MoLE gates
    over the library, and each `fixed` baseline (one adapter of the library's total rank); a Dynamic
    LoRA (its gates run per token) in its own pass against the base."""
    from loramux.routers import load_router

    ids = torch.randint(100, base.model.config.vocab_size - 100, (8, 96), generator=torch.Generator().manual_seed(0))

    def fwd(fused, mix):
        def f():
            with torch.no_grad(), fused.mixture(mix):
                base.model(input_ids=ids, logits_to_keep=1)
        return f
    out = {"base": 1.0}
    if lib is not None:
        fused = FusedModel(base)
        for a in lib.names():
            fused.load(lib, a)
        names = lib.names()
        mixes = {"base": None, "oracle": fused.sequence_mixture([{names[0]: 1.0}]),
                 "uniform": fused.sequence_mixture([{a: 1 / len(names) for a in names}]),
                 "dlp": fused.sequence_mixture([{names[i % len(names)]: 0.5, names[(i + 1) % len(names)]: 0.5}
                                                for i in range(8)])}
        mixes["arrow"] = load_router(lib, "arrow", fused=fused).layer_mixture()
        for name in MOLE:
            if name in lib.routers():
                mixes[name] = load_router(lib, "mole", name=name, fused=fused).layer_mixture()
        t = _median_times({k: fwd(fused, m) for k, m in mixes.items()}, reps)
        fused.unfuse()
        out.update({k: round(v / t["base"], 3) for k, v in t.items()})
    present = [n for n in FIXED if fixed is not None and n in fixed]
    if present:  # in their own pass: loading adapters beside the library's would stale its routers
        fused = FusedModel(base)
        for name in present:
            fused.load(fixed, name)
        own = _median_times({"base": fwd(fused, None),
                             **{n: fwd(fused, fused.sequence_mixture([{n: 1.0}])) for n in present}}, reps)
        out.update({n: round(own[n] / own["base"], 3) for n in present})
        fused.unfuse()
    if dynamic is not None:
        fused = FusedModel(base)
        first = dynamic.names()[0]
        fused.load(dynamic, first)
        own = _median_times({"base": fwd(fused, None), "dynamic": fwd(fused, fused.sequence_mixture([{first: 1.0}]))},
                            reps)
        out["dynamic"] = round(own["dynamic"] / own["base"], 3)
        fused.unfuse()
    return out


def cost_ratios(base, lib: Library, strategies: list[str], reps: int = 3,
                dynamic: Library | None = None) -> dict[str, float]:
    """Forward time of 8 x 96 tokens under each strategy's kind of mixture, / the base forward."""
    kinds = kind_ratios(base, lib, dynamic, reps)
    out = {s: kinds[kind_of(s)] if kind_of(s) in kinds else kinds["oracle"] for s in strategies}
    if "mole_layer" in kinds:  # MoLE's gating over a fixed mixture of the same adapters (issue 6)
        out["_gate_cost_ratio"] = round(kinds["mole_layer"] / kinds["uniform"], 3)
    return out


def common_args(doc: str) -> argparse.ArgumentParser:
    """What the library benchmarks share: data, library, model, tasks, sample size, seed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--tasks", default=None, help="default: every task in --data-dir")
    ap.add_argument("--limit-per-task", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def setup(args) -> tuple:
    """(base, library with every task's adapter, task names), training what is missing."""
    from loramux._home import default_library_path

    base = load_base(args.model) if args.model else load_base()
    lib = Library(args.library or default_library_path(), create=True)
    tasks = args.tasks.split(",") if args.tasks else sorted(p.name for p in Path(args.data_dir).iterdir() if p.is_dir())
    ensure_library(base, lib, args.data_dir, tasks)
    return base, lib, tasks


ROUTED = ("base", "oracle", "uniform", "dlp_p0.3", "dlp_p0.6", "dlp_p0.9", "dlp_p1.0", *MOLE, "arrow")
FIXED = ("ties", "dare", "multitask")
DERIVED = (*ROUTED, "ties", "dare")  # rows whose weights are the private library's, or merged from it
EXTRAS = {"mbc": "mbc_arrow", "dynamic": "dynamic_oracle"}


def recipes(args, base, train: list) -> dict[str, dict]:
    """What decides each strategy's row: a row stored with the same recipe is not computed again.
    Every row shares the model, the tasks and their data, the private library's training recipe and
    the test sample; some add their own knobs. The weights themselves are recorded beside each row
    (`library_sha`), so rows computed on different builds of the same recipe can be told apart."""
    from loramux.training.dynamic import DynamicConfig

    common = {"model": base.fingerprint, "data": {t.name: len(t) for t in train}, "adapter": LoraTrainConfig().to_dict(),
              "limit_per_task": args.limit_per_task, "seed": args.seed}
    out = {s: common for s in ROUTED}
    out.update({m: {**common, "merge": {**MERGE, "rank": "library total"}} for m in ("ties", "dare")})
    out.update({m: {**common, "mole_steps": args.mole_steps, "gates": mole_config(m, args.mole_steps)}
                for m in MOLE if m in ROUTED})
    out["multitask"] = {**common, "multitask_steps": args.multitask_steps}
    out["mbc_arrow"] = {**common, "mbc_k": args.mbc_k}
    out["dynamic_oracle"] = {**common, "dynamic": dataclasses.asdict(DynamicConfig())}
    return out


def library_sha(lib: Library, names: list[str] | None = None) -> str:
    """A digest of the adapters' weight files (their sha256 as the library records them)."""
    import hashlib

    specs = [lib.get(n) for n in (names or lib.names())]
    return hashlib.sha256(json.dumps({s.name: s.files for s in specs}, sort_keys=True).encode()).hexdigest()[:16]


def row_build(row: dict) -> str | None:
    """The build of the private library a row was scored on (a merge records the library it merged;
    a library row's own weights are that build)."""
    return row.get("build", row.get("library_sha"))


def set_aside(result: dict, recipe: dict, wanted: list[str], rescore: set[str], build: str | None) -> dict:
    """The rows of `result` this run keeps. A wanted row whose recipe changed, or one named in
    `rescore` that another build of the private library scored (`build`: today's, None when none is
    built yet), moves to `superseded`, never silently lost; so a resumed --rescore run goes on where
    it stopped. Rows this run does not ask for stay as they are."""
    recipes, superseded = result.get("recipes", {}), result.setdefault("superseded", {})
    kept = {}
    for s, row in result.get("strategies", {}).items():
        stale = s in wanted and recipes.get(s) != recipe.get(s)
        rebuilt = s in rescore and (build is None or row_build(row) != build)
        if not (stale or rebuilt):
            kept[s] = row
            continue
        superseded[superseded_key(superseded, s, f"build{row.get('library_sha')}")] = {
            "why": RECIPE_CHANGED if stale else OTHER_BUILD, "row": row, "recipe": recipes.get(s),
            "command": row.get("command", result.get("command")), "date": row.get("date", result.get("date"))}
    return kept


def restore(result: dict, recipe: dict, wanted: list[str], kept: dict, build: str | None) -> None:
    """Bring back into `kept` each wanted row that a run with other flags set aside, when today's
    flags give its recipe again (the newest such), and, for a row of the private library's weights,
    when it was scored on today's build."""
    superseded = result.get("superseded", {})
    for key in reversed(list(superseded)):
        s, old = key.split("@")[0], superseded[key]
        if s in wanted and s not in kept and old.get("why") == RECIPE_CHANGED and old.get("recipe") == recipe.get(s) \
                and (s not in DERIVED or row_build(old["row"]) == build):
            kept[s] = superseded.pop(key)["row"]
            log(f"{s}: its row set aside by an earlier run has this recipe again; restored")


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--mole-steps", type=int, default=400, help="at most (validation stops it)")
    ap.add_argument("--multitask-steps", type=int, default=120,
                    help="0: the library's total steps (matched compute; 840 for 14 x 60)")
    ap.add_argument("--mbc-k", type=int, default=5,
                    help="MBC clusters for mbc_arrow (3 and 5 have committed clusterings; with 3, Arrow's top-4 "
                         "takes every cluster, so 5 is the default)")
    ap.add_argument("--with", dest="extra", default="", help="mbc,dynamic: also the library-sized extras")
    ap.add_argument("--strategies", default=None, help="score only these (default: all built)")
    ap.add_argument("--rescore", default="",
                    help="score these strategies again where their row came from another build of the private "
                         "library (after a rebuild, so that rows compared come from one build); the old rows "
                         "move to `superseded`")
    ap.add_argument("--output", default=str(RESULTS / "composite.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path, loramux_home, prediction_cache_path

    started = time.perf_counter()
    out = Path(args.output)
    extras = set(filter(None, args.extra.split(",")))
    if extras - set(EXTRAS):
        raise SystemExit(f"--with {sorted(extras - set(EXTRAS))}: the extras are {', '.join(EXTRAS)}")
    wanted = args.strategies.split(",") if args.strategies else \
        [*(s for s in ROUTED if s not in NEEDS_GRID), *FIXED, *(EXTRAS[e] for e in sorted(extras))]
    known = (*ROUTED, *FIXED, *EXTRAS.values())
    rescore = set(filter(None, args.rescore.split(",")))
    if set(wanted) - set(known):
        raise SystemExit(f"--strategies {sorted(set(wanted) - set(known))}: unknown; choose from {', '.join(known)}")
    if rescore - set(wanted):
        raise SystemExit(f"--rescore {sorted(rescore - set(wanted))}: not among the strategies this run scores "
                         f"({', '.join(wanted)})")
    base = load_base(args.model) if args.model else load_base()
    lib_path = Path(args.library or default_library_path())
    tasks = args.tasks.split(",") if args.tasks else sorted(p.name for p in Path(args.data_dir).iterdir() if p.is_dir())
    train, test = load_tasks(args.data_dir, tasks, "train"), load_tasks(args.data_dir, tasks, "test")
    recipe = json.loads(json.dumps(recipes(args, base, train)))  # as stored: tuples read back as lists
    # Rows already in the output with the same recipe stay: each is hours of CPU, and a run that
    # spans sessions (or machines, with the adapter cache gone) goes on from what was committed.
    result = json.loads(out.read_text()) if out.is_file() else {}
    build = library_sha(Library(lib_path)) if (lib_path / "loramux-library.json").is_file() else None
    kept = set_aside(result, recipe, wanted, rescore, build)
    restore(result, recipe, wanted, kept, build)
    stored = result.get("recipes", {})
    result.update(strategies=kept, recipes={s: recipe[s] if s in wanted else stored.get(s, recipe.get(s)) for s in kept})
    todo = [s for s in wanted if s not in kept]
    log(f"kept from {out.name}: {sorted(kept) or 'none'}; to compute: {todo or 'none'}")
    config = EvalConfig((), args.limit_per_task, args.seed, cache_dir=str(prediction_cache_path()))
    timings: dict = result.setdefault("train_seconds", {})
    kinds: dict = result.setdefault("cost_kind_ratios", {})

    def keep(name: str, row: dict, sha: str, merged_from: str | None = None) -> None:
        # each row names the run that scored it: the file's `command` is only the last run's
        result["strategies"][name] = {**row, "library_sha": sha, **({"build": merged_from} if merged_from else {}),
                                      "command": "python " + " ".join(sys.argv),
                                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        result["recipes"][name] = recipe[name]
        log(f"{name}: average {row['average']:.4f}")
        write(result, out)

    lib = None
    if any(s in ROUTED or s in FIXED for s in todo):  # everything but the extras needs the private library
        lib = Library(lib_path, create=True)
        ensure_library(base, lib, args.data_dir, tasks)
        if any(s.startswith("dlp") for s in todo):
            ensure_dlp(lib, args.data_dir, timings)
        if any(s in MOLE for s in todo):
            ensure_mole(base, lib, args.data_dir, args.mole_steps, timings, tuple(s for s in todo if s in MOLE))
        work = Library(lib.path.with_name(lib.path.name + "-baselines"), create=True)
        if {"ties", "dare"} & set(todo):
            ensure_merges(base, lib, work, timings)
        if "multitask" in todo:
            result["multitask_steps"] = ensure_multitask(base, lib, work, args.data_dir, args.multitask_steps)
        for s in (s for s in todo if s in ROUTED):
            fused = FusedModel(base)
            r = evaluate(fused, lib, test, dataclasses.replace(config, strategies=(f"mole:{s}" if s in MOLE else s,)),
                         log=log)
            fused.unfuse()
            row = next(iter(r["strategies"].values()))
            if "routing" in r:
                result.setdefault("routing", {}).update(r["routing"])
            result.update(n_per_task=r["n_per_task"], seed=r["seed"], adapters=r["adapters"])
            keep(s, row, library_sha(lib))
        for s in (s for s in todo if s in FIXED):  # each as the only adapter, from the side library
            side = Library(Path(tempfile.mkdtemp()) / "one", create=True)
            side.add(s, work.adapter_dir(s), base=base, tasks=tuple(tasks))
            fused = FusedModel(base)
            r = evaluate(fused, side, test, dataclasses.replace(config, strategies=("oracle",)), log=log)
            fused.unfuse()
            keep(s, r["strategies"]["oracle"], library_sha(work, [s]), library_sha(lib) if s in DERIVED else None)
    dynamic = None
    if "mbc_arrow" in todo:  # the MBC cluster library, routed by Arrow
        k = args.mbc_k
        committed = out.parent / f"mbc_k{k}" / "clustering.json"
        if committed.is_file():  # the committed clustering, so every machine trains the same clusters
            from loramux.library.clustering import Clustering

            side, clustering = ensure_mbc(base, Library(lib_path, create=True), args.data_dir, k,
                                          clustering=Clustering.load(committed))
        else:
            lib = lib or Library(lib_path, create=True)
            ensure_library(base, lib, args.data_dir, tasks)
            side, clustering = ensure_mbc(base, lib, args.data_dir, k, out.parent / f"mbc_k{k}")
        fused = FusedModel(base)
        r = evaluate(fused, side, test, dataclasses.replace(config, strategies=("arrow",)), log=log)
        fused.unfuse()
        result["mbc_clusters"] = clustering.members
        keep("mbc_arrow", r["strategies"]["arrow"], library_sha(side))
    dyn_path = lib_path.with_name(f"{lib_path.name}-dynamic-oracle")
    if "dynamic_oracle" in todo:  # each task's Dynamic LoRA as its oracle
        dynamic = ensure_dynamic_oracle(base, lib_path, tasks, args.data_dir, timings)
        fused = FusedModel(base)
        r = evaluate(fused, dynamic, test, dataclasses.replace(config, strategies=("oracle",)), log=log)
        fused.unfuse()
        keep("dynamic_oracle", r["strategies"]["oracle"], library_sha(dynamic))
    elif "dynamic_oracle" in wanted and "dynamic" not in kinds and (dyn_path / "loramux-library.json").is_file():
        dynamic = Library(dyn_path)
    # costs: every kind this run can measure, side by side; kinds it cannot (no library built this
    # run) keep their ratios from the run that measured them
    measured: dict[str, float] = {}
    if lib is not None or dynamic is not None:
        fixed = Library(lib_path.with_name(lib_path.name + "-baselines")) if lib is not None else None
        measured = kind_ratios(base, lib, dynamic, fixed=fixed)
        kinds.update(measured)
        result["cost_measured"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "kinds": sorted(measured)}
    for k in [k for k in kinds if k != "base" and all(kind_of(s) != k for s in result["strategies"])]:
        del kinds[k]  # a ratio no row uses (a gate set stored in the library but not scored here, say)
    for s, v in result["strategies"].items():
        v["cost_ratio"] = kinds.get(kind_of(s))  # None until a run with what it needs measures it
    # MoLE's gating over the uniform mixture of the same adapters (issue 6), both from one run
    if {"mole_layer", "uniform"} <= measured.keys():
        result["mole_gate_cost_ratio"] = round(measured["mole_layer"] / measured["uniform"], 3)
    elif "mole_layer" not in kinds:
        result.pop("mole_gate_cost_ratio", None)
    order = [s for s in (*ROUTED, *FIXED, *EXTRAS.values()) if s in result["strategies"]]
    result["strategies"] = {s: result["strategies"][s] for s in order}
    result.update({"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": machine(), "limit_per_task": args.limit_per_task, "mole_steps": args.mole_steps,
                   "wall_seconds_last_run": round(time.perf_counter() - started, 1), "home": str(loramux_home()),
                   "missing": [s for s in wanted if s not in result["strategies"]]})
    result["cold_run_seconds"] = cold_run_seconds(result, lib_path, timings, args.mbc_k)
    builds = {v["library_sha"] for s, v in result["strategies"].items() if s in ROUTED}
    if len(builds) > 1:
        log(f"note: the library strategies' rows come from {len(builds)} builds of the same recipe")
    write(result, out, final=True)


def cold_run_seconds(result: dict, lib_path: Path, timings: dict, mbc_k: int) -> dict:
    """What a cold run of this command costs on this machine, part by part: the recorded training
    time of every adapter it uses (whichever run or session trained it; an adapter that two
    libraries share, by recipe, counts once), the routers, gates and merges, and each row's scoring.
    Parts whose library is not on this machine are left out and named in `not_here`."""
    seen: set[str] = set()

    def trained(path: Path, only: str | None = None) -> float | None:
        if not (path / "loramux-library.json").is_file() or (only and only not in Library(path)):
            return None
        total = 0.0
        for spec in Library(path).list() if only is None else [Library(path).get(only)]:
            t = spec.training
            key = json.dumps([t.data, t.config], sort_keys=True) if t else None
            if t is None or key in seen:
                continue
            seen.add(key)
            total += t.seconds
        return round(total, 1)

    parts = {"library": trained(lib_path),
             "multitask": trained(lib_path.with_name(lib_path.name + "-baselines"), "multitask"),
             f"mbc_k{mbc_k}": trained(lib_path.with_name(f"{lib_path.name}-mbc{mbc_k}")),
             "dynamic_oracle": trained(lib_path.with_name(lib_path.name + "-dynamic-oracle")),
             # the routers, gates and merges this file's rows used (not those of superseded rows); the
             # Dynamic LoRAs' training is their library's, above
             **{f"train_{k}": v for k, v in timings.items() if k in result["strategies"] and k != "dynamic_oracle"},
             "scoring": round(sum(v.get("seconds") or 0.0 for v in result["strategies"].values()), 1)}
    if any(s.startswith("dlp") for s in result["strategies"]):  # a router trained by an older run has no timing
        parts["train_dlp"] = timings.get("dlp")
    gates = [s for s in MOLE if s in result["strategies"]]
    lib = Library(lib_path) if gates and (lib_path / "loramux-library.json").is_file() else None
    stored = lib.routers() if lib is not None else {}
    for s in gates:  # the stored gates' own record, whoever trained them (mole.py trains some)
        parts[f"train_{s}"] = gate_info(lib, s).get("seconds") if s in stored else None
    out = {k: v for k, v in parts.items() if v is not None}
    out["total"] = round(sum(out.values()), 1)
    out["not_here"] = sorted(k for k, v in parts.items() if v is None)
    return out


def targets(result: dict) -> list[str]:
    """The issues' targets, each with the numbers it is judged on (reported, not tuned to). Rows are
    compared only within one build of the private library (`library_sha`): after a rebuild, a row
    kept from the old build says nothing about the new one's oracle."""
    rows = result["strategies"]
    avg = {k: v["average"] for k, v in rows.items()}
    pts = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = []

    def check(name: str, ok: bool, detail: str) -> None:
        lines.append(f"- {name}: **{'met' if ok else 'missed'}** ({detail})")

    def comparable(*names: str) -> bool:
        if not set(names) <= avg.keys():
            return False
        if len({rows[n].get("library_sha") for n in names}) == 1:
            return True
        lines.append(f"- {', '.join(names)}: not compared (rows from different builds of the library)")
        return False
    if comparable("dlp_p0.6", "oracle", "uniform"):
        d, o, u = avg["dlp_p0.6"], avg["oracle"], avg["uniform"]
        check("DLP (p = 0.6) ≥ oracle − 1 point", d >= o - 0.01, f"{pts(d)} vs {pts(o)}")
        check("DLP (p = 0.6) ≥ uniform mixture + 5 points", d >= u + 0.05, f"{pts(d)} vs {pts(u)}")
    for m in (m for m in MOLE if m in avg):
        if comparable(m, "uniform", "oracle"):  # issue 27's goals for MoLE (masking: mole.py)
            u, o = avg["uniform"], avg["oracle"]
            tag = f"MoLE ({m}{', an ablation' if m in MOLE_ABLATIONS else ''})"
            check(f"{tag} ≥ uniform mixture + 5 points", avg[m] >= u + 0.05, f"{pts(avg[m])} vs {pts(u)}")
            check(f"{tag} ≥ oracle − 3 points", avg[m] >= o - 0.03, f"{pts(avg[m])} vs {pts(o)}")
    for a in (a for a in ("arrow", "mbc_arrow") if a in avg and "base" in avg):
        check(f"{a} ≥ base", avg[a] >= avg["base"], f"{pts(avg[a])} vs {pts(avg['base'])}")
    if "multitask" in avg:
        lines.append(f"- multi-task LoRA (the library's rank and steps in one adapter): {pts(avg['multitask'])}, "
                     f"against oracle {pts(avg.get('oracle', float('nan')))} and DLP (p = 0.6) "
                     f"{pts(avg.get('dlp_p0.6', float('nan')))}")
    return lines


def summary_markdown(result: dict) -> str:
    """Targets, each strategy's cost and scoring time, and what a cold run of the command costs."""
    rows = ["| strategy | average | forward cost (× base) | scoring s | weights (library_sha) |", "|---|---|---|---|---|"]
    for k, v in result["strategies"].items():
        cost = "–" if v.get("cost_ratio") is None else f"{v['cost_ratio']:.2f}"
        rows.append(f"| {k} | {v['average']:.3f} | {cost} | {v.get('seconds') or 0:.0f} | {v.get('library_sha')} |")
    parts = result.get("cold_run_seconds", {})
    cold = ", ".join(f"{k} {v / 60:.0f} min" for k, v in parts.items() if k not in ("total", "not_here"))
    n = sum(result.get("n_per_task", {}).values()) or 1
    text = ["## Targets", "", f"Points of the average; one prompt of the {n} moves one task's score by "
            f"{100 * len(result.get('n_per_task', {None: 0})) / n:.1f} points and the average by {100 / n:.2f}.", "",
            *targets(result), "",
            "## Cost", "", "Forward of 8 × 96 tokens under each strategy's mixture, side by side with the base "
            "model's, median of 3.", "", *rows, ""]
    if parts:
        text += ["## Time on this machine", "",
                 f"A cold run (nothing cached) costs about {parts['total'] / 3600:.1f} h: {cold}. "
                 f"This run took {result['wall_seconds_last_run'] / 60:.0f} min."
                 + (f" Not on this machine, so not counted: {', '.join(parts['not_here'])}." if parts.get("not_here")
                    else ""), ""]
    return "\n".join(text)


def write(result: dict, out: Path, final: bool = False) -> None:
    """composite.json after every row; with `final`, also composite.md and the plots."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if final and result["strategies"] and all(v.get("cost_ratio") is not None for v in result["strategies"].values()):
        result["plots"] = plot_results(result, out.parent, prefix="composite")
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not final or not result["strategies"]:
        return
    md = to_markdown({**result, "strategies": {k: {**v, "metric": v.get("metric") or
                                                   next(iter(result["strategies"].values()))["metric"]}
                                               for k, v in result["strategies"].items()}})
    out.with_suffix(".md").write_text(f"# Composite benchmark\n\n`{result['command']}` on {result['machine']['cpu']}, "
                                      f"{result['date']}\n\n{md}\n\n{summary_markdown(result)}")
    print(md)


if __name__ == "__main__":
    main()
