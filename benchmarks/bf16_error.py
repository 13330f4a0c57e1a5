"""How far bf16 moves the default model's logits, fused and PEFT alike, from the fp32 result.

Three random r = 8 adapters, a batch of 3 rows × 48 random tokens, each row with its own adapter
(PEFT's `adapter_names`). Both loramux and PEFT are compared with loramux in fp32 (which equals
PEFT in fp32 here: 0.0); the bf16 base model alone against the fp32 base sets the scale of the
noise. On the CPU unless --device says otherwise.

    python benchmarks/bf16_error.py [--device cpu]

Writes benchmarks/results/bf16_error.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramux.bench.machine import machine
from loramux.bench.speed import random_adapter, write_peft
from loramux.fusion import FusedModel
from loramux.library.checks import read_peft_dir
from loramux.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "bf16_error.json"))
    args = ap.parse_args()
    from peft import PeftModel

    ref = load_base(device=args.device)
    files = {n: random_adapter(ref, 8, seed=i) for i, n in enumerate("abc")}
    ids = torch.randint(100, ref.model.config.vocab_size - 100, (3, 48),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = [{"a": 1.0}, {"b": 1.0}, {"c": 1.0}]
    logits = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dirs = {n: write_peft(f, Path(tmp) / n) for n, f in files.items()}
        for dtype in ("float32", "bfloat16"):
            base = load_base(device=args.device, dtype=dtype)
            logits["base", dtype] = base.model(input_ids=ids).logits.float()
            fused = FusedModel(base)
            for n in dirs:
                fused.add_adapter(n, read_peft_dir(dirs[n]))
            with fused.mixture(fused.sequence_mixture(rows)):
                logits["loramux", dtype] = base.model(input_ids=ids).logits.float()
            fused.unfuse()
            peft = PeftModel.from_pretrained(load_base(device=args.device, dtype=dtype).model, dirs["a"], adapter_name="a")
            for n in "bc":
                peft.load_adapter(dirs[n], adapter_name=n)
            logits["peft", dtype] = peft.eval()(input_ids=ids, adapter_names=["a", "b", "c"]).logits.float()

    def err(a, b):
        d = (a - b).abs()
        return {"max": round(float(d.max()), 4), "mean": round(float(d.mean()), 4)}

    truth = logits["loramux", "float32"]
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "device": args.device, "logit_scale": round(float(truth.abs().max()), 2),
           "fp32_peft_vs_loramux": err(logits["peft", "float32"], truth),
           "bf16_base_vs_fp32_base": err(logits["base", "bfloat16"], logits["base", "float32"]),
           "bf16_loramux_vs_fp32": err(logits["loramux", "bfloat16"], truth),
           "bf16_peft_vs_fp32": err(logits["peft", "bfloat16"], truth),
           "bf16_loramux_vs_bf16_peft": err(logits["loramux", "bfloat16"], logits["peft", "bfloat16"])}
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "command", "date")}, indent=1))


if __name__ == "__main__":
    main()
