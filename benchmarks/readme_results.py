"""Regenerate the README's results table from the committed files under benchmarks/results/.

Every figure in that table is read from a results file here (a file that is absent leaves its
rows out), so the README cannot drift from what the benchmarks measured.

    python benchmarks/readme_results.py [--check]

`--check` exits 1 when the README's table differs from what the files give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start (benchmarks/readme_results.py) -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _x(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}×"


def foundation(d: dict) -> list[tuple[str, str]]:
    rows = []
    for name, t in d["tasks"].items():
        what = "accuracy" if t["metric"] == "multiple_choice_grade" else "exact match"
        rows.append((f"{name}, one LoRA (60 steps, batch 8, r = 8)",
                     f"{what} {t['base']:.3f} → {t['adapter']:.3f} (n = {t['n_test']})"
                     + (f", training {t['train_seconds']:.0f} s" if "train_seconds" in t else "")))
    return rows


def speed(d: dict) -> list[tuple[str, str]]:
    r = d["ratios"]
    return [
        ("forward, 8 × 96 tokens, one adapter",
         f"{_x(r['loramux_single'])} base, folded into the weights, the fold itself {_x(r['loramux_fold_only'])} "
         f"(unfolded {_x(r['loramux_single_unfolded'])}; PEFT {_x(r['peft_single'])})"),
        ("forward, every row its own 3-of-14 mixture",
         f"{_x(r['loramux_hetero3'])} base (PEFT, one adapter per row: {_x(r['peft_mixed'])})"),
        ("decode, batch 1 / batch 8, one adapter",
         f"{_x(r['decode_b1_speedup'])} / {_x(r['decode_b8_speedup'])} the tokens/s of PEFT + `generate` "
         f"(the base model alone: {_x(r['decode_b1_ceiling'])} / "
         f"{_x(d['decode']['base_b8_tokens_per_s'] / d['decode']['peft_b8_tokens_per_s'])})"),
        (f"{d['memory']['adapters']} adapters of rank {d['memory']['rank']} loaded",
         f"resident memory {_x(d['memory']['rss_over_raw'])} their raw tensor bytes"),
    ]


def serve(d: dict) -> list[tuple[str, str]]:
    r, res = d["ratios"], d["results"]
    big = next(k for k in res if k.startswith("concurrent16_mixed_") and k.endswith("_adapters"))
    n_big = big.split("_")[2]
    kind = " random stand-in" if d.get("adapters_note") else ""  # same shapes as the trained ones
    return [(f"`loramux serve`, {d['adapters']}{kind} adapters, {d['tokens']} tokens per request over HTTP",
             f"16 concurrent clients with different 3-adapter mixtures: {_x(r['concurrent16_vs_sequential'])} the "
             f"throughput of one at a time; {_x(r['mixed_vs_base_concurrent16'])} the base model's at 16 concurrent; "
             f"{_x(r['library100_vs_14'])} with {n_big} adapters loaded"
             + (f" (median of {d['rounds']} rounds)" if d.get("rounds") else ""))]


def scale(d: dict) -> list[tuple[str, str]]:
    r, t = d["ratios"], d["training"]
    return [
        ("`loramux serve --ray`, 1 replica, vs `loramux serve`, 8 concurrent mixed requests",
         f"throughput {_x(r['ray_serve_vs_local_throughput'])}, p50 latency {_x(r['ray_serve_vs_local_p50_latency'])}"),
        (f"{t['adapters']} short adapters with `train --ray` vs one after another (2 cores)",
         f"{_x(r['ray_train_vs_sequential_time'])} the time (Ray start {t['ray_start_s']:.1f} s)"),
    ]


def router_dlp(d: dict) -> list[tuple[str, str]]:
    rows = [(f"DLP router ({d['encoder']} + {d['head_params'] / 1e6:.2f}M-param head) on the "
             f"{d['library']['adapters']} test sets, {d['n_test']:,} prompts",
             f"top-1 accuracy {d['accuracy']:.3f} (prompts in their training template: template recognition); "
             f"{d['latency_ms_b1']:.1f} ms per prompt at batch 1, "
             f"{d['latency_ms_b32']:.1f} ms at batch 32; routing {100 * d['routing_share_of_generation']:.1f}% "
             f"of a 32-token routed generation")]
    c = d.get("composite")
    if c:
        n = set(c["n_per_task"].values())
        each = f"{n.pop()} prompts each" if len(n) == 1 else f"{c['n_total']:,} prompts"
        a = c["average"]
        rows.append((f"DLP vs oracle vs base, {len(c['n_per_task'])} test sets mixed ({each})",
                     f"average {a['dlp']:.3f} / {a['oracle']:.3f} / {a['base']:.3f}"))
    return rows


def arrow(d: dict) -> list[tuple[str, str]]:
    rows = []
    if "cost_ratio_vs_single" in d:
        rows.append(("Arrow, 14 adapters, top-4 per token, 8 × 96 tokens",
                     f"{_x(d['cost_ratio_vs_single'])} the fused single-adapter forward "
                     f"(PEFT's Arrow: {_x(d['peft_cost_ratio_vs_single'])} its single adapter)"))
    if "peft_max_abs_logit_diff" in d:
        rows.append(("Arrow vs PEFT `create_arrow_model`, default model",
                     f"max logit difference {d['peft_max_abs_logit_diff']:.1e} with PEFT's power-iteration prototypes; "
                     f"{d['peft_max_abs_logit_diff_svd_prototypes']:.1e} with exact SVD prototypes"))
    acc = d.get("average_accuracy", {})
    if {"arrow", "base", "uniform"} <= set(acc):
        rows.append((f"Arrow (top-4) vs base vs uniform mixture, 14 test sets mixed ({d['limit_per_task']} prompts each)",
                     f"average {acc['arrow']:.3f} / {acc['base']:.3f} / {acc['uniform']:.3f}"
                     + "".join(f"; MBC k={k[3]} + Arrow {acc[k]:.3f}" for k in ("mbc3_arrow", "mbc5_arrow") if k in acc)))
    return rows


def mole(d: dict) -> list[tuple[str, str]]:
    a = d["average_accuracy"]
    names = {"mole_layer": "layer", "mole_block": "block", "mole_layer_no_balance": "layer without balance loss",
             "mole_layer_pooled": "layer, balance pooled over layers (paper)",
             "mole_layer_routed": "layer with the routing term",
             "mole_layer_routed_init": "layer with the routing term, fitted to route first",
             "mole_layer_routed_init_chosen": "the same, start or trained gates chosen sharpened on validation",
             "mole_layer_route_start": "layer, the routing start alone",
             "mole_layer_route_start_formats": "layer, the routing start alone, fitted in four formats"}
    gates = ", ".join(f"{label} {a[k]:.3f}" for k, label in names.items() if k in a)  # the gate sets this run scored
    steps = "; ".join(f"{k} {v['steps_run']} steps, stopped on {v['stopped']}"
                      + (f", logits x {v['sharpen']:g} chosen on validation" if v.get("sharpen", 1.0) != 1.0 else "")
                      + (", pooled over the prompt alone in training" if v.get("gate_pool") == "prompt" else "")
                      + (f", kept step {v['best_step']} ({v['kept_by']})" if v.get("kept_by") else "")
                      + (f", start fitted {fit}" if (fit := ((v.get("curve") or [{}])[0].get("route_init") or {})
                                                      .get("fit")) else "")
                      for k, v in d.get("training", {}).items())
    masked = d.get("masked_gates", "mole_layer")  # files written before --mask-gates masked mole_layer
    cost = f"; gating {_x(d['gate_cost_ratio'])} a fixed mixture" if d.get("gate_cost_ratio") else ""
    return [(f"MoLE gates, 14 test sets mixed ({d['limit_per_task']} prompts each; {steps or str(d['mole_steps']) + ' gate steps'})",
             f"average {gates}; uniform {a['uniform']:.3f}, oracle {a['oracle']:.3f}; true task's "
             f"adapter masked ({names.get(masked, masked)}) {a[masked + '_mask_true_task']:.3f}{cost}")]


def dynamic_lora(d: dict) -> list[tuple[str, str]]:
    if d.get("missing") or "average_accuracy" not in d:  # a run spanning sessions, rows so far
        done = len(d.get("runs", {}))
        return [(f"Dynamic LoRA vs LoRA, {len(d['tasks'])} tasks × {len(d['seeds'])} seeds (run in progress)",
                 f"{done} of {done + len(d.get('missing') or [])} runs done; averages once all are in")]
    a = d["average_accuracy"]
    return [(f"Dynamic LoRA vs LoRA, {len(d['tasks'])} tasks × {len(d['seeds'])} seeds, same rank budget and steps",
             f"average {a['dynamic']:.3f} vs {a['lora']:.3f} (reallocation only {a['realloc_only']:.3f}, input gate "
             f"only {a['gate_only']:.3f}){_gain(d)}; training {_x(d['train_time_ratio'])}, "
             f"inference {_x(d['inference_cost_ratio'])}")]


def _gain(d: dict) -> str:
    g = d.get("vs_lora", {}).get("dynamic")
    if not g:
        return ""
    return (f"; paired gain {100 * g['mean_gain']:+.1f} ± {100 * g['stderr']:.1f} pts (s.e., {g['pairs']} pairs: "
            f"within seed noise)" if abs(g["mean_gain"]) < 2 * g["stderr"] else
            f"; paired gain {100 * g['mean_gain']:+.1f} ± {100 * g['stderr']:.1f} pts (s.e., {g['pairs']} pairs)")


def composite(d: dict) -> list[tuple[str, str]]:
    s = d["strategies"]
    best = sorted(s, key=lambda k: -s[k]["average"])
    build = s.get("oracle", {}).get("library_sha")
    own = [k for k in best if k in OWN_WEIGHTS]
    older = [k for k in best if k not in OWN_WEIGHTS and s[k].get("build", s[k].get("library_sha")) != build]
    return [(f"every strategy, 14 test sets mixed ({d['limit_per_task']} prompts each; `composite.md`)",
             "average " + ", ".join(f"{k} {s[k]['average']:.3f}" for k in best)
             + (f" (still to run: {', '.join(d['missing'])})" if d.get("missing") else "")
             + (f"; the library's rows from one build (sha {build[:8]})" if build else "")
             + (f"; {', '.join(own)}: weights of their own" if own else "")
             + (f"; {', '.join(older)}: an older build" if older else ""))]


# composite.json rows whose weights are not the private library's (merged, trained apart)
OWN_WEIGHTS = ("ties", "dare", "multitask", "mbc_arrow", "dynamic_oracle")


def routing_real(d: dict) -> list[tuple[str, str]]:
    f, a, g = d["formats"], d["abstention"], d["growth"]
    drop = a["composite_drop_points"]
    return [
        (f"DLP router trained on 6 formats, {sum(d['n_test'].values()):,} in-library test prompts in 3 formats",
         f"top-1 own template {f['own']:.3f}, a template never trained on {f['other_template']:.3f}, raw content "
         f"{f['raw']:.3f} (abstention off; the stored thresholds abstain on "
         + ", ".join(f"{100 * d['formats_detail'][k]['abstained_at_stored_thresholds']:.1f}%" for k in f)
         + " of them)"),
        (f"DLP abstention (energy, per-adapter thresholds at {a['threshold_recall_on_validation']:.0%} validation "
         f"recall) vs "
         f"{len(d['n_unseen'])} BIG-bench tasks outside the library ({sum(d['n_unseen'].values())} prompts)",
         f"AUROC {a['auroc']:.3f}; {a['abstain_rate_at_95_recall']:.1%} of them abstained at 95% in-library recall; "
         f"at the stored thresholds {a['per_format']['own']['out_of_library_abstained_at_stored_thresholds']:.1%}, "
         f"in-library recall {a['per_format']['own']['in_library_recall_at_stored_thresholds']:.1%}; composite cost "
         + (f"{drop['measured']:.2f} points" if drop.get("measured") is not None
            else f"≤ {drop['upper_bound']:.2f} points (bound; estimate {drop['estimate']:.2f}, not measured)")),
        *([(f"Arrow's own out-of-library score (a token's best cosine to a prototype), "
            f"{d['in_forward_routers']['n_in_library']} in-library vs "
            f"{d['in_forward_routers']['n_out_of_library']} unseen test prompts",
            f"AUROC {d['in_forward_routers']['arrow']['auroc']:.3f}: too weak to abstain on, so Arrow and MoLE "
            f"abstain by the DLP router's test in front of them (docs/routing.md)")]
          if "auroc" in d.get("in_forward_routers", {}).get("arrow", {}) else []),
        *([(f"DLP's out-of-library test in front of Arrow / the routed MoLE gates, 14 test sets mixed "
            f"({behind['limit_per_task']} prompts each)",
            f"composite cost {behind['arrow']['drop_points']:.2f} / {behind['mole_routed']['drop_points']:.2f} points "
            f"({behind['arrow']['abstained_in_library']} / {behind['mole_routed']['abstained_in_library']} prompts "
            f"sent to the base model)" + (f"; the gates fitted to route first {behind['mole_routed_init']['drop_points']:.2f} "
                                          f"points" if "mole_routed_init" in behind else "")
            + (f"; that start alone {behind['mole_route_start']['drop_points']:.2f} points"
               if "mole_route_start" in behind else ""))]
          if (behind := d.get("in_forward_routers", {}).get("behind_dlp_test")) else []),
        (f"a 15th adapter added and the DLP head retrained from cached embeddings "
         f"({'the trained library' if d['library'] == 'given' else d['library']})",
         f"{d['growth_seconds']:.1f} s, {g['prompts_encoded']:,} of {g['prompts_in_training']:,} prompts encoded "
         f"(add {g['add_adapter_s']:.1f}, retrain {g['retrain_head_s']:.1f}, load "
         f"{g['load_new_router_s']:.1f}; the 14-adapter router's full training {g['first_train_seconds_for_comparison']:.1f} s; "
         f"prompts an earlier run in the same home encoded are read from the cache)"),
    ]


def unseen(d: dict) -> list[tuple[str, str]]:
    vs = d.get("versus", {}).get("minus_base", {})
    if not vs:
        return []
    n = sum(d["n_per_task"].values())
    ranked = sorted(vs, key=lambda k: -vs[k]["difference"])
    goals = d["versus"].get("goals", {})
    half = [(v["high"] - v["low"]) / 2 for v in vs.values()]
    return [(f"the 14-task library zero-shot on {len(d['n_per_task'])} BIG-bench tasks outside it ({n} prompts), "
             f"points against base ({d['average']['base']:.3f}); the 95% paired bootstrap intervals are "
             f"±{min(half):.1f} to ±{max(half):.1f} points wide",
             ", ".join(f"{k} {vs[k]['difference']:+.2f}" for k in ranked)
             + (f"; routers below base − 0.5: {', '.join(goals['routers_below_base_minus_0.5'])}"
                if goals.get("routers_below_base_minus_0.5") else "")
             + (f"; as served by default (the test on where the library has one) below base − 0.5: "
                f"{', '.join(goals['as_served_below_base_minus_0.5']) or 'none'}" if "as_served" in goals else "")
             + (f" (not scored: {', '.join(d['not_scored'])})" if d.get("not_scored") else "")
             + ("; *_general: what the routers abstain on is served by the multi-task LoRA, named the "
                "library's general adapter" if any(k.endswith("_general") for k in vs) else ""))]


def general_cost(d: dict) -> list[tuple[str, str]]:
    runs = d["runs"]

    def moves(run: dict) -> str:
        a, b = run["ratios"]["library"], run["ratios"]["with_general"]
        return ", ".join(f"{k} {a[k]:.2f} -> {b[k]:.2f}" for k in ("arrow", "mole_layer_routed", "dlp")
                         if k in a and k in b)

    rows = [("a rank-112 general adapter (the multi-task LoRA) loaded beside the 14 rank-8 adapters, forward of "
             "8 x 96 tokens / base, every slot padded to the largest rank (the fused layer before the own-rank "
             "layouts)", moves(runs["padded_multitask"]) + " (no router gives it weight)")]
    if "padded" in runs and "own_ranks" in runs:
        rows.append(("the same with a random rank-112 stand-in as general, the same script run over the padded "
                     "and then the own-rank fused layer", f"padded: {moves(runs['padded'])}; own ranks: "
                     f"{moves(runs['own_ranks'])}"))
    return rows


def general_decode_cost(d: dict) -> list[tuple[str, str]]:
    runs = d["runs"]

    def moves(run: dict) -> str:
        r = run["tokens_per_s_vs_library"]
        return f"no row on it {r['routed']:.2f}, 2 of 8 rows on it {r['two_general']:.2f}"

    if not {"padded", "pieces"} <= set(runs):
        return []
    return [("compiled decode, 8 greedy rows, tokens/s with a rank-112 stand-in general adapter loaded beside the "
             "14 rank-8 adapters / without it; the adapter table padded to the widest rank, then the general "
             "adapter split over several positions", f"padded: {moves(runs['padded'])}; split: {moves(runs['pieces'])}")]


SOURCES = [("foundation.json", foundation), ("speed.json", speed), ("serve.json", serve), ("scale.json", scale),
           ("router_dlp.json", router_dlp), ("routing_real.json", routing_real),
           ("unseen_all_prompts.json", unseen), ("arrow.json", arrow), ("mole.json", mole), ("mole_routed.json", mole),
           ("mole_routed_sharpen.json", mole), ("mole_routed_pooled.json", mole), ("mole_routed_init.json", mole),
           ("mole_route_start.json", mole), ("mole_routed_init_chosen.json", mole),
           ("mole_route_start_standardized.json", mole), ("mole_routed_init_chosen_standardized.json", mole),
           ("mole_route_start_formats.json", mole),
           ("general_cost.json", general_cost), ("general_decode_cost.json", general_decode_cost),
           ("dynamic_lora.json", dynamic_lora), ("composite.json", composite)]


def table() -> str:
    lines = ["| what | result | file |", "|---|---|---|"]
    for name, rows in SOURCES:
        d = _load(name)
        if d is None:
            continue
        for what, result in rows(d):
            lines.append(f"| {what} | {result} | `{name}` |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if args.check:
        sys.exit(0 if new == text else 1)
    readme.write_text(new)


if __name__ == "__main__":
    main()
