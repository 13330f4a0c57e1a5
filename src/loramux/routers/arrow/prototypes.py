"""Arrow prototypes (ALGORITHMS.md §4, arXiv 2405.11157): for each adapter and adapted module, the
top right singular vector of ΔW = B·A, a direction in the module's input space.

Computed exactly from the rank-r factors without forming the d_out×d_in product: with B = Q·R
(thin QR, Q orthonormal), B·A = Q·(R·A), so ΔW has the singular values and right singular
vectors of the r×d_in matrix R·A, whose SVD is cheap. (PEFT's Arrow runs 15 power iterations
instead, which is close but not exact when the top two singular values are near each other.)

`method="power"` instead runs PEFT's procedure (a fixed number of power iterations on
AᵀBᵀBA from a seeded Gaussian start, in fp32), for logits that match PEFT's Arrow exactly. On
trained adapters whose top singular values are close, 15 iterations stop far from the top
singular vector (benchmarks/results/arrow.json reports the cosines), and without a seed PEFT's
start, and so its routing, changes from run to run.

Prototypes are cached in the library per adapter, keyed by the sha256 of its weights and the
method, so they are recomputed only for adapters that changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...library.checks import WEIGHTS_FILE, PeftFiles, lora_factors, read_peft_dir

if TYPE_CHECKING:
    from ...library import Library

CACHE_DIR = Path("cache") / "arrow"


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit vector v maximising |B·A·v|, from A (r, d_in) and B (d_out, r). Its sign is fixed so
    that its largest-magnitude entry is positive (Arrow uses |⟨h, v⟩|, so the sign is free)."""
    _, R = torch.linalg.qr(B.double())  # (r, r)
    _, _, Vh = torch.linalg.svd(R @ A.double(), full_matrices=False)
    v = Vh[0]
    if v[v.abs().argmax()] < 0:
        v = -v
    return v.to(A.dtype)


def power_iteration_vector(A: torch.Tensor, B: torch.Tensor, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """PEFT's approximation: `iters` steps of v <- AᵀBᵀB A v / norm from a seeded N(0, I) start."""
    A32, B32 = A.float(), B.float()
    gram = B32.T @ B32  # (r, r)
    v = torch.randn(A32.shape[1], generator=torch.Generator(device=A32.device.type).manual_seed(seed),
                    dtype=A32.dtype, device=A32.device)
    v = v / (v.norm() + 1e-8)
    for _ in range(iters):
        w = A32.T @ (gram @ (A32 @ v))
        v = w / (w.norm() + 1e-8)
    return v.to(A.dtype)


def adapter_prototypes(files: PeftFiles, method: str = "svd", iters: int = 15, seed: int = 0) -> dict[str, torch.Tensor]:
    """Module name -> prototype (d_in,) for every module the adapter adapts."""
    factors = sorted(lora_factors(files).items())
    if method == "svd":
        return {module: top_right_singular_vector(ab["A"].float(), ab["B"].float()) for module, ab in factors}
    return {module: power_iteration_vector(ab["A"].float(), ab["B"].float(), iters, seed) for module, ab in factors}


def library_prototypes(library: "Library", name: str, method: str = "svd", iters: int = 15,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter's prototypes, from the library's cache when its weights are unchanged."""
    from safetensors.torch import load_file, save_file

    spec = library.get(name)
    digest = spec.files.get(WEIGHTS_FILE, "")[:16]
    tag = "svd" if method == "svd" else f"power{iters}s{seed}"
    cache = library.path / CACHE_DIR
    path = cache / f"{name}-{tag}-{digest}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache file is only a cache: recompute it
            pass
    library.check_files(name)
    protos = adapter_prototypes(read_peft_dir(library.adapter_dir(name)), method, iters, seed)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{path.name}.tmp"
    save_file({k: v.contiguous() for k, v in protos.items()}, str(tmp), metadata={"adapter": name, "sha256": digest})
    os.replace(tmp, path)  # atomic
    for stale in cache.glob(f"{name}-{tag}-*.safetensors"):  # older versions of this adapter
        if stale != path and stale.name.rsplit("-", 2)[0] == name:
            stale.unlink(missing_ok=True)
    return protos
