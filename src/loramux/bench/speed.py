"""Speed of fused multi-LoRA inference against PEFT, measured side by side in one run.

K random adapters (rank r, all seven projections) on the default model; a batch of B prompts of
T tokens. Every variant runs once per repetition, variants interleaved, and the medians are
reported, together with each median divided by the base forward of the same run (`ratios`).
Forwards return only the last position's logits, as prefill in generation does (the LoRA share
of the cost is then larger than with full logits, i.e. the ratios are the demanding kind).
Decode speed is the time of 33 new tokens minus the time of 1 (prefill excluded), per token.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..engine import Engine, GenerationRequest, SamplingParams
from ..fusion import FusedModel
from ..library.checks import PeftFiles, read_peft_dir
from ..models import DEFAULT_MODEL, BaseModel, load_base
from ..training.config import LLAMA_TARGETS
from .machine import machine


def random_adapter(base: BaseModel, rank: int, seed: int) -> PeftFiles:
    """A PEFT-format LoRA with random factors of realistic scale on all seven projections."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_in, d_out) in base.linear_shapes().items():
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LLAMA_TARGETS),
              "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True}
    return PeftFiles(config=config, tensors=tensors, metadata={}, path=Path(f"<random adapter {seed}>"))


def write_peft(files: PeftFiles, path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(files.config))
    save_file(files.tensors, path / "adapter_model.safetensors")
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _used_bytes(device: torch.device) -> int:
    """Host RSS on the CPU; the allocator's live bytes on an accelerator."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()


def memory_probe(model: str, n: int, rank: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """Memory added by loading n random adapters into a fused model, vs their raw bytes (the
    process's resident memory on the CPU, the device's allocated bytes on CUDA)."""
    base = load_base(model, device=device, dtype=dtype)
    where = base.model.device
    fused = FusedModel(base)
    raw = 0
    before = _used_bytes(where)
    for i in range(n):
        f = random_adapter(base, rank, seed=1000 + i)
        raw += sum(t.numel() * t.element_size() for t in f.tensors.values())
        fused.add_adapter(f"m{i}", f)
        del f
    rss = _used_bytes(where) - before
    return {"adapters": n, "rank": rank, "raw_tensor_bytes": raw, "fused_adapter_bytes": fused.adapter_bytes(),
            "rss_delta_bytes": rss, "fused_over_raw": fused.adapter_bytes() / raw, "rss_over_raw": rss / raw}


def _median_times(variants: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                  device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each variant; on an accelerator each run ends with a synchronize, so the
    time is the work's, not the launch's."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():  # interleaved: drift on a shared machine hits every variant alike
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if rep >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# The matmul kernels a step may run: BLAS GEMMs (plain and batched, the fused layer's bmm paths
# among them) and oneDNN's prepacked linear (cpu_linear.PackedLinear).
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def decode_step_profile(base: BaseModel, prompt_ids: torch.Tensor, steps: int = 8, fused=None, mix=None) -> dict:
    """Where one decode step spends its time (torch.profiler): the matmuls against everything
    else. For the plain base model at batch 1 this is the floor for any LoRA engine built on the
    same forward, so it bounds `decode_b1_speedup`; with `fused` and a mixture `mix` it shows
    what the adapters add to a step."""
    import contextlib

    from torch.profiler import profile

    mixed = fused.mixture(mix) if fused is not None else contextlib.nullcontext()
    with torch.no_grad(), mixed:
        out = base.model(input_ids=prompt_ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        with profile() as prof:
            for _ in range(steps):
                out = base.model(input_ids=nxt, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        wall = (time.perf_counter() - start) / steps
    self_us = {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}
    total = sum(self_us.values())
    top = dict(sorted(self_us.items(), key=lambda kv: -kv[1])[:6])
    return {"rows": int(prompt_ids.shape[0]), "step_ms_profiled": wall * 1e3, "ops_self_ms": total / 1e3,
            "mm_share": sum(self_us.get(op, 0) for op in _MATMUL_OPS) / total,
            "top_ops_self_ms": {k: v / 1e3 for k, v in top.items()}}


def gemm_row_scaling(base: BaseModel, rows: tuple[int, ...] = (1, 2, 4, 8, 16), reps: int = 50) -> dict:
    """Time of one projection (x @ W^T, the model's widest MLP weight) against the number of rows,
    with the plain kernel (`F.linear`) and with the oneDNN-prepacked weight the server uses
    (`cpu_linear.PackedLinear`; "packed_*" keys, absent without oneDNN).

    Batching decode pays off only while a GEMM costs about the same for 16 rows as for 1, i.e.
    while reading W dominates. If time grows with the rows, the kernel is compute-bound (or
    re-lays out W per call) at these shapes and `16 / (t16 / t1)` caps what batch-16 decode can
    gain over batch 1, for the base model and for any LoRA engine on top of it."""
    from ..cpu_linear import PackedLinear, packing_available

    linear = max((m for m in base.model.modules() if isinstance(m, torch.nn.Linear)
                  and m.weight.shape[0] != base.model.config.vocab_size), key=lambda m: m.weight.numel())
    d_out, d_in = linear.weight.shape
    kernels = {"": lambda x: torch.nn.functional.linear(x, linear.weight)}
    if packing_available():
        packed = PackedLinear(linear, min_rows=1)
        kernels["packed_"] = packed
    out: dict = {"shape": [int(d_out), int(d_in)]}
    with torch.no_grad():
        for prefix, fn in kernels.items():
            times = {}
            for n in rows:
                x = torch.randn(n, d_in)
                fn(x)  # warm-up (and the one-time packing)
                runs = []
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn(x)
                    runs.append((time.perf_counter() - t) / reps)
                times[n] = statistics.median(runs)
            out[prefix + "us"] = {str(n): round(t * 1e6, 2) for n, t in times.items()}
            out[prefix + "time_over_1_row"] = {str(n): round(t / times[rows[0]], 3) for n, t in times.items()}
            out[prefix + "batching_ceiling"] = {str(n): round(n * times[rows[0]] / t, 2) for n, t in times.items()}
    if "packed_us" in out:
        out["packed_speedup"] = {n: round(out["us"][n] / out["packed_us"][n], 2) for n in out["us"]}
    return out


def run(model: str = DEFAULT_MODEL, adapters: int = 14, rank: int = 8, batch: int = 8, prompt_len: int = 96,
        reps: int = 7, decode_tokens: int = 32, memory_adapters: int = 100, seed: int = 0,
        device: str = "cpu", dtype: str = "float32") -> dict:
    from peft import PeftModel

    from ..models import resolve_device, resolve_dtype

    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    plain = load_base(model, device=device, dtype=dtype)
    on = plain.model.device
    names = [f"a{i}" for i in range(adapters)]
    files = {n: random_adapter(plain, rank, seed=i) for i, n in enumerate(names)}
    ids = torch.randint(100, plain.model.config.vocab_size - 100, (batch, prompt_len)).to(on)
    mask = torch.ones_like(ids)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: write_peft(f, Path(tmp) / n) for n, f in files.items()}
        peft = PeftModel.from_pretrained(load_base(model, device=device, dtype=dtype).model, dirs[names[0]],
                                         adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(dirs[n], adapter_name=n)
        peft.eval()
        peft.add_weighted_adapter(names[:3], [0.5, 0.3, 0.2], "cat3", combination_type="cat")

        fused_base = load_base(model, device=device, dtype=dtype)
        engine = Engine(fused_base)
        for n in names:
            engine.fused.add_adapter(n, read_peft_dir(dirs[n]))
        fused = engine.fused

        hetero_rows = [dict(zip(rng.sample(names, 3), (0.5, 0.3, 0.2))) for _ in range(batch)]
        mixed_names = [names[i % adapters] for i in range(batch)]

        def fwd(m, **kw):
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kw)

        def peft_with(adapter: str, **kw):
            def f():
                peft.set_adapter(adapter)
                fwd(peft, **kw)
            return f

        def fused_with(rows, fold=False):
            def f():
                # A new mixture object each time: the gather (and the fold) is timed too.
                with fused.mixture(fused.sequence_mixture(rows), fold=fold):
                    fwd(fused_base.model)
                fused.release()
            return f

        def fold_only():  # what folding one adapter into all adapted weights costs by itself
            mix = fused.sequence_mixture([{names[0]: 1.0}])
            for layer in fused.layers.values():
                layer._folded_weight(mix, ids.device)
            fused.release()

        forward = _median_times({
            "base": lambda: fwd(plain.model),
            "peft_single": peft_with(names[0]),
            "peft_mixed": peft_with(names[0], adapter_names=mixed_names),
            "peft_cat3": peft_with("cat3"),
            # What the engine does with a mixture the whole batch shares: fold it (fold cost timed),
            # in fp32; a half-precision base is never folded (fusion/layer.py), so there it is unfolded.
            "loramux_single": fused_with([{names[0]: 1.0}] * batch, fold=True),
            "loramux_single_unfolded": fused_with([{names[0]: 1.0}] * batch),
            "loramux_hetero3": fused_with(hetero_rows),
            **({"loramux_fold_only": fold_only} if dtype == "float32" else {}),
        }, reps, device=on)

        # ---- decode tokens/s, batch 1 and batch B, same adapter, greedy
        tok = plain.tokenizer
        decode = {}
        for b in (1, batch):
            prompt_ids = ids[:b]
            texts = [tok.decode(row) for row in prompt_ids]

            def ours(n_new, texts=texts):
                sp = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
                engine.generate([GenerationRequest(t, {names[0]: 1.0}, sp, chat=False) for t in texts])

            def theirs(n_new, prompt_ids=prompt_ids):
                peft.set_adapter(names[0])
                with torch.no_grad():
                    peft.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                  max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id)

            def base_only(n_new, prompt_ids=prompt_ids):
                with torch.no_grad():
                    plain.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                         do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                                         pad_token_id=tok.pad_token_id)

            t = _median_times({
                "loramux_full": lambda: ours(decode_tokens + 1), "loramux_prefill": lambda: ours(1),
                "peft_full": lambda: theirs(decode_tokens + 1), "peft_prefill": lambda: theirs(1),
                "base_full": lambda: base_only(decode_tokens + 1), "base_prefill": lambda: base_only(1),
            }, reps=3, device=on)
            for who in ("loramux", "peft", "base"):
                decode[f"{who}_b{b}_tokens_per_s"] = b * decode_tokens / (t[f"{who}_full"] - t[f"{who}_prefill"])

        if on.type == "cpu":  # the profile counts CPU time
            decode["base_b1_step_profile"] = decode_step_profile(plain, ids[:1])

    # ---- memory: many adapters loaded at once, measured in a fresh process (this one has freed
    # whole models, whose pages the allocator would hand back to the adapters and hide the cost)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        memory = pool.apply(memory_probe, (model, memory_adapters, rank, device, dtype))

    ratios = {k: forward[k] / forward["base"] for k in forward if k != "base"}
    # What bounds decode: base-model generate with no adapter, the floor for any LoRA engine.
    ratios["decode_b1_ceiling"] = decode["base_b1_tokens_per_s"] / decode["peft_b1_tokens_per_s"]
    ratios["decode_b1_speedup"] = decode["loramux_b1_tokens_per_s"] / decode["peft_b1_tokens_per_s"]
    ratios[f"decode_b{batch}_speedup"] = decode[f"loramux_b{batch}_tokens_per_s"] / decode[f"peft_b{batch}_tokens_per_s"]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": {"model": model, "adapters": adapters, "rank": rank, "targets": list(LLAMA_TARGETS), "batch": batch,
                  "prompt_len": prompt_len, "reps": reps, "decode_tokens": decode_tokens, "device": device, "dtype": dtype,
                  "forward_logits": "last position only (logits_to_keep=1)"},
        "forward_median_seconds": forward,
        "decode": decode,
        "memory": memory,
        "ratios": ratios,
    }
