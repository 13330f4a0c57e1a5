"""Dynamic LoRA vs plain LoRA (issue 7): same rank budget, steps and seeds, on several tasks;
plus the ablation (reallocation only, input gate only). Adapters are cached in a side library
(<library>-dynamic) as <task>-<variant>-s<seed>, so an interrupted run resumes.

    python benchmarks/dynamic_lora.py --data-dir ../shared/data/bigbench \\
        --tasks intent_recognition,hyperbaton,navigate,winowhy,object_counting,word_unscrambling \\
        --seeds 0,1 [--steps 60] [--limit-per-task 80]

Writes benchmarks/results/dynamic_lora.json and dynamic_lora_allocation.png (the first task's final
ranks and importance per layer). A plain LoRA whose recipe (data, config, seed) equals the private
library's adapter for that task is that adapter, so it is reused rather than trained again (listed
under `reused_from_library`). The training-time ratio comes from a short side-by-side timing in the
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
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    train = {t.name: t for t in load_tasks(args.data_dir, tasks, "train")}
    test = load_tasks(args.data_dir, tasks, "test")
    idx = sample_indices(test, args.limit_per_task, 0)
    private = Library(root) if root.exists() else None
    for task in tasks:
        for seed in seeds:
            for variant, dyn in VARIANTS.items():
                name = f"{task}-{variant}-s{seed}"
                if name in side:
                    continue
                config = LoraTrainConfig(steps=args.steps, seed=seed,
                                         warmup_steps=min(LoraTrainConfig.warmup_steps, args.steps))
                if dyn is None and private is not None and same_recipe(private, task, [train[task]], config):
                    # the private library's adapter for this task is this very run (same data, config, seed)
                    print(f"[dynamic] {name}: the library's {task!r} adapter has this recipe; reusing it",
                          file=sys.stderr, flush=True)
                    side.add(name, private.adapter_dir(task), base=base, tasks=(task,),
                             training=private.get(task).training)
                    continue
                print(f"[dynamic] training {name}", file=sys.stderr, flush=True)
                if dyn is None:
                    result = train_lora(base, train[task], config)
                    side.add(name, result.model, base=base, tasks=(task,), training=result.summary)
                    result.model.unload()
                else:
                    result = train_dynamic(base, train[task], config, dyn)
                    side.add(name, result.files, base=base, tasks=(task,), training=result.summary)
    step_seconds = timed_training(base, train[tasks[0]], args.timing_steps)  # before the fused layers go in
    fused = FusedModel(base)
    scorer = MixtureScorer(fused, cache_dir=str(prediction_cache_path()))
    scores: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for t in test:
        for seed in seeds:
            for variant in VARIANTS:
                name = f"{t.name}-{variant}-s{seed}"
                fused.load(side, name)
                preds = scorer.score(t, [{name: 1.0}] * len(idx[t.name]), idx[t.name])
                scores[variant].setdefault(t.name, []).append(result_of(t, preds).score)
                fused.remove_adapter(name)
                scorer.memo.clear()
    per_task = {v: {t: round(statistics.mean(s), 4) for t, s in d.items()} for v, d in scores.items()}
    average = {v: round(statistics.mean(d.values()), 4) for v, d in per_task.items()}
    reused = [f"{t}-lora-s{s}" for t in tasks for s in seeds
              if private and t in private and side.get(f"{t}-lora-s{s}").training == private.get(t).training]
    seconds = {v: statistics.mean(side.get(f"{t}-{v}-s{s}").training.seconds for t in tasks for s in seeds)
               for v in VARIANTS}
    # inference: the fused forward with one gated (dynamic) adapter vs one plain adapter, 8 x 96 tokens
    ids = torch.randint(100, base.model.config.vocab_size - 100, (8, 96), generator=torch.Generator().manual_seed(0))
    plain, dyn_name = f"{tasks[0]}-lora-s{seeds[0]}", f"{tasks[0]}-dynamic-s{seeds[0]}"
    fused.load(side, plain)
    fused.load(side, dyn_name)

    def fwd(name):
        def f():
            with torch.no_grad(), fused.mixture(fused.sequence_mixture([{name: 1.0}])):
                base.model(input_ids=ids, logits_to_keep=1)
        return f
    t = _median_times({"lora": fwd(plain), "dynamic": fwd(dyn_name)}, 3)
    fused.unfuse()

    def params(name: str, lora_only: bool) -> int:
        from loramux.library.checks import read_peft_dir

        tensors = read_peft_dir(side.adapter_dir(name)).tensors
        return sum(v.numel() for k, v in tensors.items() if not lora_only or ".lora_gate." not in k)
    # the final rank allocation and importance of one Dynamic LoRA, as training stored them with it
    from loramux.training.dynamic import plot_allocation

    shown = side.get(f"{tasks[0]}-dynamic-s{seeds[0]}").training.config["dynamic"]
    png = Path(args.output).with_name(Path(args.output).stem + "_allocation.png")
    plot_allocation(shown["ranks"], shown["importance"], png)
    spread = {}
    for task in tasks:
        ranks = side.get(f"{task}-dynamic-s{seeds[0]}").training.config["dynamic"]["ranks"]
        spread[task] = {"min": min(ranks.values()), "max": max(ranks.values()), "total": sum(ranks.values())}
    out = {
        "allocation_png": png.name, "final_rank_spread_s0": spread,
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "tasks": tasks, "seeds": seeds, "steps": args.steps, "limit_per_task": args.limit_per_task,
        "average_accuracy": average, "per_task": per_task,
        # training time side by side in this process (the long runs above share the machine with whatever
        # else ran, and reused adapters were timed in another session): seconds per step, median of reps
        "train_time_ratio": round(step_seconds["dynamic"] / step_seconds["lora"], 3),
        "train_step_seconds": step_seconds, "train_timing": f"{args.timing_steps} steps of {tasks[0]}, alternated, "
                                                            "median of 3 per variant",
        "train_seconds_mean_long_runs": seconds, "reused_from_library": reused,
        "inference_cost_ratio": round(t["dynamic"] / t["lora"], 3),
        "param_count": {"lora": params(f"{tasks[0]}-lora-s{seeds[0]}", False),
                        "dynamic": params(f"{tasks[0]}-dynamic-s{seeds[0]}", False),
                        "dynamic_lora_factors_only": params(f"{tasks[0]}-dynamic-s{seeds[0]}", True)},
        "reading": "loramux's reading of arXiv 2501.14859 (abstract only): see src/loramux/training/dynamic.py",
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("average_accuracy", "train_time_ratio", "inference_cost_ratio", "param_count")},
                     indent=1))


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
