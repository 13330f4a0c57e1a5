"""Dynamic LoRA vs plain LoRA (issue 7): same rank budget, steps and seeds, on several tasks;
plus the ablation (reallocation only, input gate only). Adapters are cached in a side library
(<library>-dynamic) as <task>-<variant>-s<seed>, so an interrupted run resumes.

    python benchmarks/dynamic_lora.py --data-dir ../shared/data/bigbench \\
        --tasks intent_recognition,hyperbaton,navigate,winowhy,object_counting,word_unscrambling \\
        --seeds 0,1 [--steps 60] [--limit-per-task 80]

Writes benchmarks/results/dynamic_lora.json.
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
    for task in tasks:
        for seed in seeds:
            for variant, dyn in VARIANTS.items():
                name = f"{task}-{variant}-s{seed}"
                if name in side:
                    continue
                config = LoraTrainConfig(steps=args.steps, seed=seed,
                                         warmup_steps=min(LoraTrainConfig.warmup_steps, args.steps))
                print(f"[dynamic] training {name}", file=sys.stderr, flush=True)
                if dyn is None:
                    result = train_lora(base, train[task], config)
                    side.add(name, result.model, base=base, tasks=(task,), training=result.summary)
                    result.model.unload()
                else:
                    result = train_dynamic(base, train[task], config, dyn)
                    side.add(name, result.files, base=base, tasks=(task,), training=result.summary)
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
    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "tasks": tasks, "seeds": seeds, "steps": args.steps, "limit_per_task": args.limit_per_task,
        "average_accuracy": average, "per_task": per_task,
        "train_time_ratio": round(seconds["dynamic"] / seconds["lora"], 3), "train_seconds_mean": seconds,
        "inference_cost_ratio": round(t["dynamic"] / t["lora"], 3),
        "param_count": {"lora": params(f"{tasks[0]}-lora-s{seeds[0]}", False),
                        "dynamic": params(f"{tasks[0]}-dynamic-s{seeds[0]}", False),
                        "dynamic_lora_factors_only": params(f"{tasks[0]}-dynamic-s{seeds[0]}", True)},
        "reading": "loramux's reading of arXiv 2501.14859 (abstract only): see src/loramux/training/dynamic.py",
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("average_accuracy", "train_time_ratio", "inference_cost_ratio", "param_count")},
                     indent=1))


if __name__ == "__main__":
    main()
