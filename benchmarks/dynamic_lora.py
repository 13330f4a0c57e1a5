"""Dynamic LoRA vs plain LoRA (issue 7): same rank budget, steps and seeds, on several tasks;
plus the ablation (reallocation only, input gate only). Adapters are cached in a side library
(<library>-dynamic) as <task>-<variant>-s<seed>, so an interrupted run resumes.

    python benchmarks/dynamic_lora.py --data-dir ../shared/data/bigbench \\
        --tasks intent_recognition,hyperbaton,navigate,winowhy,object_counting,word_unscrambling \\
        --seeds 0,1 [--steps 60] [--limit-per-task 80]

Writes benchmarks/results/dynamic_lora.json and dynamic_lora_allocation.png (the first task's final
ranks and importance per layer). Each (task, seed, variant) run is one unit: train, score on the
task's test sample, and write its row into the JSON (`runs`) at once. A restarted run skips every
row already there with the same recipe, so the ~48 trainings (hours of CPU) can span sessions and
machines: commit the JSON between sessions and nothing is trained twice, even with the adapter
cache gone. The summary (`average_accuracy`, ratios, plot) is written once every row is in. A plain LoRA whose recipe (data, config, seed) equals the private
library's adapter for that task is that adapter, so it is reused rather than trained again (marked
`reused_from_library`). The training-time ratio comes from a short side-by-side timing in the
same process, not from the long runs, which share the machine with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import Library, LoraTrainConfig, load_base, load_tasks
from loramux.bench.machine import machine
from loramux.bench.speed import _median_times
from loramux.evaluation import MixtureScorer
from loramux.evaluation.harness import sample_indices
from loramux.evaluation.scoring import result_of
from loramux.library.checks import read_peft_dir
from loramux.fusion import FusedModel
from loramux.training import train_lora
from loramux.training.dynamic import DynamicConfig, train_dynamic

from composite import same_recipe  # a sibling script (benchmarks/ is on the path when run)

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"lora": None, "dynamic": DynamicConfig(), "realloc_only": DynamicConfig(input_gate=False),
            "gate_only": DynamicConfig(realloc=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--tasks", default="intent_recognition,hyperbaton,navigate,winowhy,object_counting,word_unscrambling")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit-per-task", type=int, default=80)
    ap.add_argument("--timing-steps", type=int, default=6, help="steps per variant in the side-by-side training timing")
    ap.add_argument("--library", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default=str(RESULTS / "dynamic_lora.json"))
    args = ap.parse_args()

    from loramux._home import default_library_path, prediction_cache_path

    base = load_base(args.model) if args.model else load_base()
    root = Path(args.library or default_library_path())
    side = Library(root.with_name(root.name + "-dynamic"), create=True)
    private = Library(root) if root.exists() else None
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    train = {t.name: t for t in load_tasks(args.data_dir, tasks, "train")}
    test = {t.name: t for t in load_tasks(args.data_dir, tasks, "test")}
    idx = sample_indices(list(test.values()), args.limit_per_task, 0)
    out_path = Path(args.output)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    recipe = {"model": base.fingerprint, "steps": args.steps, "limit_per_task": args.limit_per_task}
    if out.get("recipe") != recipe:  # rows of another recipe are not comparable: start over
        out = {"recipe": recipe}
    runs = out.setdefault("runs", {})

    def save() -> None:
        out.update(command="python " + " ".join(sys.argv), machine=machine(), tasks=tasks, seeds=seeds,
                   steps=args.steps, limit_per_task=args.limit_per_task,
                   date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   missing=[f"{t}-{v}-s{s}" for t in tasks for s in seeds for v in VARIANTS if f"{t}-{v}-s{s}" not in runs])
        out_path.write_text(json.dumps(out, indent=1) + "\n")  # each row is minutes of training: keep it

    if "train_step_seconds" not in out:
        step_seconds = timed_training(base, train[tasks[0]], args.timing_steps)
        out.update(train_step_seconds=step_seconds,
                   train_time_ratio=round(step_seconds["dynamic"] / step_seconds["lora"], 3),
                   train_timing=f"{args.timing_steps} steps of {tasks[0]}, alternated, median of 3 per variant")
        save()
    for task in tasks:  # task -> seed -> variant: the first task's rows (plot, inference ratio) come first
        for seed in seeds:
            for variant, dyn in VARIANTS.items():
                name = f"{task}-{variant}-s{seed}"
                if name in runs:
                    continue
                reused = ensure_adapter(base, side, private, name, train[task], args.steps, seed, dyn)
                plotted = (task, seed) == (tasks[0], seeds[0])  # its full allocation goes into the plot
                runs[name] = run_row(base, side, name, test[task], idx[task], str(prediction_cache_path()), plotted)
                runs[name].update(task=task, variant=variant, seed=seed, reused_from_library=reused)
                if variant == "dynamic" and f"{task}-lora-s{seed}" in side and "inference_cost_ratio" not in out:
                    out["inference_cost_ratio"], out["inference_seconds"] = inference_ratio(
                        base, side, f"{task}-lora-s{seed}", name)
                save()
    summarise(out, tasks, seeds, out_path)
    save()
    print(json.dumps({k: out.get(k) for k in ("average_accuracy", "train_time_ratio", "inference_cost_ratio",
                                              "param_count")}, indent=1))


def ensure_adapter(base, side: Library, private: Library | None, name: str, task, steps: int, seed: int,
                   dyn: DynamicConfig | None) -> bool:
    """The adapter `name` in the side library: trained now, or taken from the private library when
    that adapter is this very run (same data, config and seed; then True)."""
    if name in side:
        return side.get(name).training == (private.get(task.name).training if private and task.name in private
                                           else None)
    config = LoraTrainConfig(steps=steps, seed=seed, warmup_steps=min(LoraTrainConfig.warmup_steps, steps))
    if dyn is None and private is not None and same_recipe(private, task.name, [task], config):
        print(f"[dynamic] {name}: the library's {task.name!r} adapter has this recipe; reusing it", file=sys.stderr,
              flush=True)
        side.add(name, private.adapter_dir(task.name), base=base, tasks=(task.name,),
                 training=private.get(task.name).training)
        return True
    print(f"[dynamic] training {name}", file=sys.stderr, flush=True)
    if dyn is None:
        result = train_lora(base, task, config)
        side.add(name, result.model, base=base, tasks=(task.name,), training=result.summary)
        result.model.unload()
    else:
        result = train_dynamic(base, task, config, dyn)
        side.add(name, result.files, base=base, tasks=(task.name,), training=result.summary)
    return False


def run_row(base, side: Library, name: str, test, idx: list[int], cache_dir: str, full_allocation: bool) -> dict:
    """One run's row: its test accuracy on the task's sample, training time and parameter counts;
    for a Dynamic LoRA the spread of its final ranks (and, for the plotted run, its final rank and
    importance per module, as training stored them)."""
    fused = FusedModel(base)
    try:
        fused.load(side, name)
        preds = MixtureScorer(fused, cache_dir=cache_dir).score(test, [{name: 1.0}] * len(idx), idx)
    finally:
        fused.unfuse()
    spec = side.get(name)
    tensors = read_peft_dir(side.adapter_dir(name)).tensors
    row = {"score": result_of(test, preds).score,
           "train_seconds": spec.training.seconds, "final_loss": spec.training.final_loss,
           "params": sum(v.numel() for v in tensors.values()),
           "lora_factor_params": sum(v.numel() for k, v in tensors.items() if ".lora_gate." not in k)}
    shown = spec.training.config.get("dynamic")
    if shown:
        ranks = shown["ranks"]
        row["rank_spread"] = {"min": min(ranks.values()), "max": max(ranks.values()), "total": sum(ranks.values())}
        if full_allocation:
            row["ranks"], row["importance"] = ranks, shown["importance"]
    return row


def inference_ratio(base, side: Library, plain: str, dynamic: str) -> tuple[float, dict]:
    """The fused forward with one gated (dynamic) adapter vs one plain adapter, 8 x 96 tokens,
    side by side in this process."""
    ids = torch.randint(100, base.model.config.vocab_size - 100, (8, 96), generator=torch.Generator().manual_seed(0))
    fused = FusedModel(base)
    fused.load(side, plain)
    fused.load(side, dynamic)

    def fwd(name):
        def f():
            with torch.no_grad(), fused.mixture(fused.sequence_mixture([{name: 1.0}])):
                base.model(input_ids=ids, logits_to_keep=1)
        return f
    try:
        t = _median_times({"lora": fwd(plain), "dynamic": fwd(dynamic)}, 3)
    finally:
        fused.unfuse()
    return round(t["dynamic"] / t["lora"], 3), t


def summarise(out: dict, tasks: list[str], seeds: list[int], out_path: Path) -> None:
    """Averages over seeds per task, then over tasks; the allocation plot; the rank spread."""
    from loramux.training.dynamic import plot_allocation

    runs = out["runs"]
    if any(f"{t}-{v}-s{s}" not in runs for t in tasks for s in seeds for v in VARIANTS):
        return
    per_task = {v: {t: round(statistics.mean(runs[f"{t}-{v}-s{s}"]["score"] for s in seeds), 4) for t in tasks}
                for v in VARIANTS}
    first = runs[f"{tasks[0]}-dynamic-s{seeds[0]}"]
    png = out_path.with_name(out_path.stem + "_allocation.png")
    plot_allocation(first["ranks"], first["importance"], png)
    out.update(
        per_task=per_task, average_accuracy={v: round(statistics.mean(d.values()), 4) for v, d in per_task.items()},
        train_seconds_mean_long_runs={v: round(statistics.mean(runs[f"{t}-{v}-s{s}"]["train_seconds"]
                                                               for t in tasks for s in seeds), 1) for v in VARIANTS},
        param_count={"lora": runs[f"{tasks[0]}-lora-s{seeds[0]}"]["params"], "dynamic": first["params"],
                     "dynamic_lora_factors_only": first["lora_factor_params"]},
        final_rank_spread_s0={t: runs[f"{t}-dynamic-s{seeds[0]}"]["rank_spread"] for t in tasks},
        # Paired by (task, seed): both variants see the same data order and init seed, so the
        # difference's standard error is the honest yardstick for "better than LoRA".
        vs_lora=_paired_vs_lora(runs, tasks, seeds),
        average_per_seed={v: {str(s): round(statistics.mean(runs[f"{t}-{v}-s{s}"]["score"] for t in tasks), 4)
                              for s in seeds} for v in VARIANTS},
        reused_from_library=sorted(n for n, r in runs.items() if r.get("reused_from_library")),
        allocation_png=png.name,
        reading="loramux's reading of arXiv 2501.14859 (abstract only): see src/loramux/training/dynamic.py")


def _paired_vs_lora(runs: dict, tasks: list[str], seeds: list[int]) -> dict[str, dict[str, float]]:
    """Mean accuracy gain over the plain LoRA of the same (task, seed), with its standard error."""
    out = {}
    for v in VARIANTS:
        if v == "lora":
            continue
        d = [runs[f"{t}-{v}-s{s}"]["score"] - runs[f"{t}-lora-s{s}"]["score"] for t in tasks for s in seeds]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        out[v] = {"mean_gain": round(statistics.mean(d), 4), "stderr": round(se, 4), "pairs": len(d),
                  "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}
    return out


def timed_training(base, task, steps: int, reps: int = 3) -> dict[str, float]:
    """Seconds per training step of plain LoRA and Dynamic LoRA (both parts on), alternated in one
    process; each call timed whole (set-up included: encoding the data, injecting the adapter)."""
    import time

    config = LoraTrainConfig(steps=steps, warmup_steps=1, checkpoint_every=0)
    times: dict[str, list[float]] = {"lora": [], "dynamic": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        r = train_lora(base, task, config, progress=False)
        times["lora"].append((time.perf_counter() - t0) / steps)
        r.model.unload()
        t0 = time.perf_counter()
        train_dynamic(base, task, config, DynamicConfig(), progress=False)
        times["dynamic"].append((time.perf_counter() - t0) / steps)
    return {k: float(f"{statistics.median(v):.4g}") for k, v in times.items()}


if __name__ == "__main__":
    main()
