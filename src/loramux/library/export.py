"""Exact export of a fixed mixture for engines that serve one LoRA per request (vLLM, SGLang,
LoRAX), or as a merged model for engines without LoRA support.

The mixture Σ_i w_i s_i B_i A_i is one LoRA of rank R = Σ_i r_i (ALGORITHMS.md, "cat" form):

    A = [A_1; …; A_k]                 (R, d_in)
    B = [w_1 s_1 B_1, …, w_k s_k B_k]  (d_out, R)

with lora_alpha = R and rsLoRA off, so the serving engine's own scale alpha/R is 1. A module an
adapter lacks gets a zero block, and an adapter with per-module ranks is zero-padded to its
largest rank, so every module has the same rank R (no rank or alpha patterns, which several
engines ignore). Unlike merging A's and B's separately (LoRAX, PEFT's "linear"), this adds no
cross terms B_i A_j.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._atomic import staging_dir
from ..errors import LoramuxError
from .checks import CONFIG_FILE, WEIGHTS_FILE, lora_factors, module_scaling, read_peft_dir

if TYPE_CHECKING:
    from ..models import BaseModel
    from .library import Library

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _check_mixture(mixture) -> dict[str, float]:
    granularity = getattr(mixture, "granularity", None)
    if granularity is not None:  # a Routing
        if granularity != "sequence":
            raise LoramuxError(f"cannot export a {mixture.router or granularity} routing: its weights change per "
                               f"{granularity}, and an exported adapter holds one fixed mixture")
        mixture = mixture.mixture
    if not mixture:
        raise LoramuxError("nothing to export: give at least one adapter with a weight (e.g. --mix a=0.5,b=0.5)")
    return dict(mixture)


def mixture_factors(library: "Library", mixture) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, list[str]]:
    """module -> (A (R, d_in), B (d_out, R)) of the rank-concatenated mixture; R; target suffixes."""
    mixture = _check_mixture(mixture)
    parts = []
    for name, weight in mixture.items():
        library.check_files(name)
        files = read_peft_dir(library.adapter_dir(name))
        factors = lora_factors(files)
        if any("gate_w" in ab for ab in factors.values()):
            raise LoramuxError(f"cannot export {name!r} exactly: it has Dynamic LoRA input gates, whose per-token "
                               f"scale no plain LoRA can express")
        parts.append((name, float(weight), files.config, factors, max(ab["A"].shape[0] for ab in factors.values())))
    modules = sorted({m for _, _, _, factors, _ in parts for m in factors})
    total = sum(r for *_, r in parts)
    out = {}
    for module in modules:
        shapes = next(f[module] for _, _, _, f, _ in parts if module in f)
        d_in, d_out = shapes["A"].shape[1], shapes["B"].shape[0]
        A = torch.zeros(total, d_in)
        B = torch.zeros(d_out, total)
        at = 0
        for name, weight, config, factors, width in parts:
            ab = factors.get(module)
            if ab is not None:
                r = ab["A"].shape[0]
                A[at:at + r] = ab["A"].float()
                B[:, at:at + r] = ab["B"].float() * (weight * module_scaling(config, module, r))
            at += width
        out[module] = (A, B)
    return out, total, sorted({m.rsplit(".", 1)[-1] for m in modules})


def export_mixture(library: "Library", mixture, dest: str | Path, base: "BaseModel") -> Path:
    """Write the mixture as one standard PEFT LoRA dir (atomically)."""
    from safetensors.torch import save_file

    factors, rank, targets = mixture_factors(library, mixture)
    dest = Path(dest).expanduser()
    if dest.exists():
        raise LoramuxError(f"export destination {str(dest)!r} already exists; choose a new path")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "base_model_name_or_path": base.model_id, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    with staging_dir(dest) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt",
                                                               "loramux.mixture": json.dumps(_check_mixture(mixture))})
    return dest


def merge_mixture(library: "Library", mixture, dest: str | Path, base: "BaseModel") -> Path:
    """Write a full HF model dir with the mixture folded into the weights (W0 + B·A per module)."""
    from transformers import AutoModelForCausalLM

    factors, _, _ = mixture_factors(library, mixture)
    dest = Path(dest).expanduser()
    if dest.exists():
        raise LoramuxError(f"export destination {str(dest)!r} already exists; choose a new path")
    source_dir = base.path
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    with torch.no_grad():
        for module, (A, B) in factors.items():
            layer = model.get_submodule(module)
            layer.weight += (B @ A).to(layer.weight.dtype)
    with staging_dir(dest) as tmp:
        model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (Path(source_dir) / extra).is_file() and not (tmp / extra).exists():
                shutil.copy2(Path(source_dir) / extra, tmp / extra)
    return dest


def serve_commands(base_path: str, dest: Path, rank: int, name: str = "mix") -> dict[str, str]:
    """Ready commands to serve the exported adapter with vLLM and SGLang."""
    vllm_rank = next((r for r in VLLM_RANKS if r >= rank), None)
    if vllm_rank is None:
        raise LoramuxError(f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
    return {
        "vllm": f"vllm serve {base_path} --enable-lora --lora-modules {name}={dest} --max-lora-rank {vllm_rank}",
        "sglang": f"python -m sglang.launch_server --model-path {base_path} --enable-lora --lora-paths {name}={dest} "
                  f"--max-lora-rank {rank}",
    }
