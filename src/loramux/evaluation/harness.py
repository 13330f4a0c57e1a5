"""The evaluation harness: strategies side by side on the same test prompts, through one scorer.

A strategy maps each test example to what the fused model runs for it: nothing (the base
model), a fixed mixture (oracle, uniform), a routed mixture (DLP at a given top-p), or an
in-forward router (Arrow). In composite mode every task's test prompts are pooled and shuffled
and each prompt is routed on its own, as a server would see them; scores are still reported per
task (each task's primary metric) and averaged over tasks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LoramuxError
from .composite import MixtureScorer
from .scoring import result_of

if TYPE_CHECKING:
    from ..data import Task
    from ..fusion import FusedModel
    from ..library import Library

FIXED = ("base", "oracle", "uniform")
IN_FORWARD = ("arrow", "arrow_gks", "arrow_abstain", "arrow_gks_abstain", "mole", "mole_abstain")


@dataclass(frozen=True)
class EvalConfig:
    # + dlp, dlp_p<P> (either with "_open": the stored out-of-library test off), arrow, arrow_gks
    # (general knowledge subtracted: the adapters' mean), mole[:name]; "_abstain" after arrow,
    # arrow_gks or mole: the library's DLP out-of-library test in front (routers/abstention.py)
    strategies: tuple[str, ...] = ("base", "oracle", "uniform")
    limit_per_task: int | None = None  # a seeded sample of each task's test set
    seed: int = 0
    batch_size: int = 8
    cache_dir: str | None = None  # keep predictions on disk: reruns and other strategies reuse them

    def __post_init__(self) -> None:
        for s in self.strategies:
            if s not in FIXED and s not in IN_FORWARD and not s.startswith(("dlp", "mole:", "mole_abstain:")):
                raise LoramuxError(f"unknown strategy {s!r}; use {list(FIXED)}, dlp, dlp_p<top-p> (e.g. dlp_p0.9; "
                                   f"'_open' after either: no abstaining), arrow, arrow_gks, "
                                   f"mole[:<stored router name>] ('_abstain' after arrow, arrow_gks or mole: the "
                                   f"library's DLP out-of-library test in front)")
            if s.startswith("dlp_p"):
                try:
                    float(s[5:].removesuffix("_open"))
                except ValueError:
                    raise LoramuxError(f"strategy {s!r}: the top-p after 'dlp_p' must be a number") from None


def sample_indices(tasks: list["Task"], limit: int | None, seed: int) -> dict[str, list[int]]:
    """A seeded sample of each task's examples; each task's own stream, so a task's sample does
    not depend on which other tasks are evaluated with it (distributed cells agree with a local run)."""
    out = {}
    for t in tasks:
        idx = list(range(len(t.examples)))
        if limit and limit < len(idx):
            idx = sorted(random.Random(f"{seed}:{t.name}").sample(idx, limit))
        out[t.name] = idx
    return out


def evaluate(fused: "FusedModel", library: "Library", tasks: list["Task"], config: EvalConfig = EvalConfig(), *,
             progress: bool = True, log=print) -> dict:
    """{"strategies": {name: {"per_task", "average", "metric", "seconds"}}, "n_per_task",
    "correct": {name: {task: [1/0 per prompt, in sample order]}}, ...}."""
    general = library.general  # loaded (it serves abstained prompts); never routed to, nor a task's own adapter
    owner = {t: s.name for s in library.routable_specs() for t in s.tasks}
    missing = [t.name for t in tasks if t.name not in owner]
    if missing and ("oracle" in config.strategies):
        raise LoramuxError(f"no adapter in the library was trained on task(s) {missing}; the oracle needs one")
    for name in library.names():
        if name not in fused.adapters:
            fused.load(library, name)
    indices = sample_indices(tasks, config.limit_per_task, config.seed)
    pool = [(t.name, i) for t in tasks for i in indices[t.name]]
    random.Random(config.seed).shuffle(pool)  # composite: every task's prompts mixed
    by_name = {t.name: t for t in tasks}
    adapters = [a for a in fused.adapters if a != general]  # the uniform mix leaves the general adapter out
    plans: dict[str, dict] = {}
    in_forward: dict = {}  # (kind, stored name) -> router, and "dlp" -> the out-of-library test
    abstained: dict[str, int] = {}  # behind the out-of-library test: prompts sent to the general adapter or base
    for s in config.strategies:
        if s == "base":
            plans[s] = {k: None for k in pool}
        elif s == "oracle":
            plans[s] = {k: {owner[k[0]]: 1.0} for k in pool}
        elif s == "uniform":
            plans[s] = {k: {a: 1.0 / len(adapters) for a in adapters} for k in pool}
        elif s.startswith(("arrow", "mole")):
            from ..routers import load_router
            from ..routers.abstention import applies, screen, stored_test

            kind, _, stored = s.partition(":")
            key = (kind.removesuffix("_abstain"), stored)  # one router object per kind: its predictions are reused
            if key not in in_forward:
                in_forward[key] = (load_router(library, "arrow", fused=fused, gks=kind.startswith("arrow_gks"))
                                   if kind.startswith("arrow") else
                                   load_router(library, "mole", fused=fused, **({"name": stored} if stored else {})))
            router, test = in_forward[key], None
            if kind.endswith("_abstain"):
                if "dlp" not in in_forward:
                    in_forward["dlp"] = stored_test(library, base=fused.base)
                test = in_forward["dlp"]
                if not applies(test, router):
                    raise LoramuxError(f"strategy {s!r} needs the library's DLP router stored with an "
                                       f"out-of-library test, for the same adapters (`loramux router train`)")
            routings = screen(test, [by_name[n].examples[i].prompt for n, i in pool], router)
            plans[s] = {k: r.mixture if r is not None else router for k, r in zip(pool, routings)}
            if test is not None:
                abstained[s] = sum(r is not None for r in routings)
        else:  # dlp, dlp_p<P>: each prompt routed on its own, in the shuffled pool's order
            from ..routers import load_router

            options = {"top_p": float(s[5:].removesuffix("_open"))} if s.startswith("dlp_p") else {}
            router = load_router(library, "dlp", **options, **({"abstain": False} if s.endswith("_open") else {}))
            plans[s] = {}
            for b in range(0, len(pool), 32):
                batch = pool[b:b + 32]
                for key, r in zip(batch, router.route([by_name[n].examples[i].prompt for n, i in batch])):
                    plans[s][key] = r.mixture
    scorer = MixtureScorer(fused, batch_size=config.batch_size, progress=progress, cache_dir=config.cache_dir)
    result: dict = {"strategies": {}, "n_per_task": {t: len(v) for t, v in indices.items()},
                    "seed": config.seed, "adapters": adapters, "correct": {}}
    routed = {s: plan for s, plan in plans.items() if s.startswith("dlp")}
    if routed:
        result["routing"] = {s: routing_confusion(plan, owner, adapters, general) for s, plan in routed.items()}
    if abstained:  # not in "routing": these routers have no per-prompt confusion matrix
        result["abstained"] = abstained
    for s, plan in plans.items():
        started = time.perf_counter()
        per_task, metric, correct = {}, {}, {}
        for t in tasks:
            idx = indices[t.name]
            preds = scorer.score(t, [plan[(t.name, i)] for i in idx], idx)
            r = result_of(t, preds)
            per_task[t.name], metric[t.name] = round(r.score, 4), r.metric
            correct[t.name] = [int(p.correct) for p in preds]  # per prompt, for paired comparisons (stats.py)
        result["correct"][s] = correct
        average = round(sum(per_task.values()) / max(1, len(per_task)), 4)
        result["strategies"][s] = {"per_task": per_task, "average": average, "metric": metric,
                                   "seconds": round(time.perf_counter() - started, 1)}
        log(f"{s}: average {average:.4f}")
    result["predictions_from_cache"] = scorer.from_disk
    return result


def routing_confusion(plan: dict, owner: dict[str, str], adapters: list[str], general: str | None = None) -> dict:
    """How a per-prompt router chose: rows are the adapter trained on the prompt's task, columns
    the adapter with the largest weight in its mixture (ties: the first in library order); `abstained`
    counts the prompts the router sent to the base model alone, or to the library's `general`
    adapter (not in the matrix)."""
    index = {a: i for i, a in enumerate(adapters)}
    counts = [[0] * len(adapters) for _ in adapters]
    sizes, true_weight = [], []

    def abstained_on(mixture) -> bool:
        return not mixture or (general is not None and set(mixture) == {general})

    abstained = sum(1 for mixture in plan.values() if abstained_on(mixture))  # any prompt's, in the library or not
    for (task, _), mixture in plan.items():
        if abstained_on(mixture):
            continue
        # how much the top-p cut keeps: adapters per routed mixture, on any prompt (a task outside
        # the library has no right adapter, but its mixtures still cost what they hold)
        sizes.append(sum(1 for w in mixture.values() if w > 0))
        if task in owner:  # and the share the right adapter gets
            top = max(mixture, key=lambda a: (mixture[a], -index[a]))
            counts[index[owner[task]]][index[top]] += 1
            true_weight.append(mixture.get(owner[task], 0.0) / (sum(mixture.values()) or 1.0))
    hits = sum(counts[i][i] for i in range(len(adapters)))
    return {"labels": adapters, "confusion": counts, "top1_accuracy": round(hits / max(1, sum(map(sum, counts))), 4),
            "mean_adapters": round(sum(sizes) / max(1, len(sizes)), 3),
            "mean_true_weight": round(sum(true_weight) / max(1, len(true_weight)), 4), "abstained": abstained}


def to_markdown(result: dict) -> str:
    """Strategies (rows) x tasks (columns) + average, each task's primary metric."""
    strategies = result["strategies"]
    tasks = list(next(iter(strategies.values()))["per_task"]) if strategies else []
    metric = next(iter(strategies.values()))["metric"] if strategies else {}
    head = "| strategy | average | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |"
    rule = "|---|---|" + "---|" * len(tasks)
    rows = [f"| {s} | {v['average']:.3f} | " + " | ".join(f"{v['per_task'][t]:.3f}" for t in tasks) + " |"
            for s, v in strategies.items()]
    n = result.get("n_per_task", {})
    note = f"\n\nExamples per task: {', '.join(f'{t} {k}' for t, k in n.items())}; seed {result.get('seed')}.\n"
    return "\n".join([head, rule, *rows]) + note
