"""The GPU benchmark: run it where a CUDA device is present (it refuses to run elsewhere).

In one run, on the default model, for fp32 and bf16 (bf16 where the device has it):

1. **correctness**: fused vs PEFT max |logit difference| for one adapter, a weighted `cat`
   mixture and a batch whose rows use different adapters (PEFT's `adapter_names`), beside the
   logits' scale and the tolerance the CPU suite states for that dtype;
2. **speed** (`loramux bench speed` on the device): forward of 8 × 96 tokens for base, PEFT
   single/mixed/cat and loramux single/unfolded/3-adapter rows, decode tokens/s at batch 1 and 8
   against PEFT's `generate`, and the device memory 100 loaded adapters take;
3. **serving**: the OpenAI-compatible server on the device, 16 concurrent streaming clients,
   base model vs 16 different 3-of-14 mixtures (random r = 8 adapters; prompts are synthetic
   sentences: the numbers measure throughput, not quality).

    python benchmarks/gpu.py [--dtypes float32,bfloat16] [--tokens 64] [--reps 7]

Writes benchmarks/results/gpu.json with the device's name, the command and the date.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
BOUND = {"float32": 1e-4, "bfloat16": 0.25}  # tests/conftest.py (Where.tol), stated for the tiny model


def correctness(dtype: str, device: str) -> dict:
    """Max |fused - PEFT| logits on the default model with three random r = 8 adapters."""
    from peft import PeftModel

    from loramux.bench.speed import random_adapter, write_peft
    from loramux.fusion import FusedModel
    from loramux.library.checks import read_peft_dir
    from loramux.models import load_base

    fused_base = load_base(device=device, dtype=dtype)
    files = {n: random_adapter(fused_base, 8, seed=i) for i, n in enumerate("abc")}
    ids = torch.randint(100, fused_base.model.config.vocab_size - 100, (3, 48),
                        generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dirs = {n: write_peft(f, Path(tmp) / n) for n, f in files.items()}
        fused = FusedModel(fused_base)
        for n in dirs:
            fused.add_adapter(n, read_peft_dir(dirs[n]))
        peft = PeftModel.from_pretrained(load_base(device=device, dtype=dtype).model, dirs["a"], adapter_name="a")
        for n in "bc":
            peft.load_adapter(dirs[n], adapter_name=n)
        peft.add_weighted_adapter(["a", "b", "c"], [0.5, 0.3, 0.2], "cat3", combination_type="cat")
        peft.eval()

        def ours(rows):
            with fused.mixture(fused.sequence_mixture(rows)):
                return fused_base.model(input_ids=ids).logits.float()

        peft.set_adapter("a")
        single = peft(input_ids=ids).logits.float()
        peft.set_adapter("cat3")
        cat = peft(input_ids=ids).logits.float()
        peft.set_adapter("a")
        mixed = peft(input_ids=ids, adapter_names=["a", "b", "c"]).logits.float()
        out["max_abs_diff"] = {
            "single": float((ours([{"a": 1.0}] * 3) - single).abs().max()),
            "cat3": float((ours([{"a": 0.5, "b": 0.3, "c": 0.2}] * 3) - cat).abs().max()),
            "rows_with_different_adapters": float((ours([{"a": 1.0}, {"b": 1.0}, {"c": 1.0}]) - mixed).abs().max()),
        }
        out["logit_scale"] = float(single.abs().max())
    out["cpu_suite_bound_on_the_tiny_model"] = BOUND.get(dtype)  # none stated for fp16
    return out


def serving(dtype: str, device: str, tokens: int) -> dict:
    """16 concurrent streaming clients through the server on the device: base vs 16 mixtures."""
    from loramux.bench.load import scenario
    from loramux.bench.speed import random_adapter
    from loramux.engine import Engine
    from loramux.models import load_base
    from loramux.server import ServerConfig, create_app
    from loramux.server.background import serve_in_background

    base = load_base(device=device, dtype=dtype)
    engine = Engine(base)
    names = [f"a{i}" for i in range(14)]
    for i, n in enumerate(names):
        engine.fused.add_adapter(n, random_adapter(base, 8, seed=i))
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    prompts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(16)]
    mixes = [dict(zip(rng.sample(names, 3), (0.5, 0.3, 0.2))) for _ in range(16)]
    server, thread, root = serve_in_background(create_app(engine, None, ServerConfig(max_batch=16, max_queue=64)))
    try:
        scenario(f"{root}/v1", prompts[:2], [None, None], 4, 2)  # warm-up (kernels, allocator)
        out = {"concurrent16_base": scenario(f"{root}/v1", prompts, [None] * 16, tokens, 16),
               "concurrent16_mixed": scenario(f"{root}/v1", prompts, mixes, tokens, 16)}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    out["mixed_vs_base"] = round(out["concurrent16_mixed"]["tokens_per_s"] / out["concurrent16_base"]["tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--output", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # --device cpu: a smoke run of this script
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    from loramux.bench.machine import machine
    from loramux.bench.speed import run

    cuda = args.device.startswith("cuda")
    dtypes = [d for d in args.dtypes.split(",") if d != "bfloat16" or not cuda or torch.cuda.is_bf16_supported()]
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "device": torch.cuda.get_device_name(0) if cuda else args.device,
           "torch": torch.__version__, "results": {}}
    for dtype in dtypes:
        r = out["results"][dtype] = {"correctness": correctness(dtype, args.device)}
        print(dtype, json.dumps(r["correctness"]), flush=True)
        speed = run(reps=args.reps, device=args.device, dtype=dtype)
        r["speed"] = {k: speed[k] for k in ("forward_median_seconds", "decode", "memory", "ratios")}
        print(dtype, json.dumps(speed["ratios"]), flush=True)
        r["serving"] = serving(dtype, args.device, args.tokens)
        print(dtype, "serving mixed/base", r["serving"]["mixed_vs_base"], flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
