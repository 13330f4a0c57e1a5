"""The machine-level figures behind the notes on this CPU: model throughput, one training step
the plain PEFT way vs loramux's, the narrow-GEMM layouts of the fused layer, and load times.

    python benchmarks/cpu_profile.py [--data-dir ../shared/data/bigbench]
Writes benchmarks/results/cpu_profile.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux import load_base, load_task
from loramux.bench.machine import machine
from loramux.bench.speed import _median_times
from loramux.data import PromptFormatter
from loramux.training.batching import answer_loss, collate, collate_left, encode_for_training

RESULTS = Path(__file__).parent / "results" / "cpu_profile.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOAD_PROBE = """
import time, json; t0 = time.perf_counter()
import torch, transformers; from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
from loramux import load_base
load_base(); t2 = time.perf_counter(); load_base(); t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "first_load_base_s": t2 - t1, "second_load_base_s": t3 - t2}))
"""


def timed(fn, reps: int) -> float:
    return _median_times({"fn": fn}, reps)["fn"]


def train_step_seconds(base, feats, *, dropout: float, answer_window: bool) -> float:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    model.train()
    pad = base.tokenizer.pad_token_id

    def step():
        if answer_window:
            inputs, labels = collate_left(feats, pad)
            loss = answer_loss(model(**inputs, logits_to_keep=labels.shape[1] + 1).logits, labels)
        else:
            loss = model(**collate(feats, pad)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = timed(step, reps=2)
    model.unload()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    args = ap.parse_args()
    base = load_base()
    task = load_task(Path(args.data_dir) / "intent_recognition", "train")
    fmt = PromptFormatter(base.tokenizer)
    feats = [encode_for_training(fmt, ex, 256) for ex in task.examples[:8]]
    ids = collate(feats, base.tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad():
        fwd = timed(lambda: base.model(input_ids=ids), reps=3)
    out = {"forward_tokens_per_s_fp32": ids.numel() / fwd, "forward_batch": list(ids.shape)}
    out["train_step_s"] = {
        "peft_plain_dropout0.05": train_step_seconds(base, feats, dropout=0.05, answer_window=False),
        "peft_plain_dropout0": train_step_seconds(base, feats, dropout=0.0, answer_window=False),
        "loramux_answer_window_dropout0": train_step_seconds(base, feats, dropout=0.0, answer_window=True),
    }
    # The fused layer's largest update, rank 8 (one adapter) and 24 (three), next to the base GEMM.
    gemm = {}
    for rows in (1, 768):
        x, w = torch.randn(rows, 576), torch.randn(1536, 576)
        y = x @ w.T
        entry = {"base_gemm_us": 1e6 * timed(lambda: x @ w.T, reps=30)}
        for r in (8, 24):
            A, B = torch.randn(r, 576), torch.randn(1536, r)
            At, Bt = A.T.contiguous(), B.T.contiguous()
            entry[f"lora_r{r}_views_us"] = 1e6 * timed(lambda: torch.addmm(y, x @ A.T, B.T), reps=30)
            entry[f"lora_r{r}_contiguous_us"] = 1e6 * timed(lambda: torch.addmm(y, x.mm(At), Bt), reps=30)
        gemm[f"rows_{rows}_576x1536"] = entry
    out["gemm"] = gemm
    probe = subprocess.run([sys.executable, "-c", LOAD_PROBE], capture_output=True, text=True, check=True)
    out["load"] = json.loads(probe.stdout.strip().splitlines()[-1])
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **out}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
