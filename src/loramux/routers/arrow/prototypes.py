"""Arrow prototypes (ALGORITHMS.md §4, arXiv 2405.11157): for each adapter and adapted module, the
top right singular vector of ΔW = B·A, a direction in the module's input space.

Computed exactly from the rank-r factors without forming the d_out×d_in product: with B = Q·R
(thin QR, Q orthonormal), B·A = Q·(R·A), so ΔW has the singular values and right singular
vectors of the r×d_in matrix R·A, whose SVD is cheap. (PEFT's Arrow runs 15 power iterations
instead, which is close but not exact when the top two singular values are near each other.)

Prototypes are cached in the library per adapter, keyed by the sha256 of its weights, so they
are recomputed only for adapters that changed.
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


def adapter_prototypes(files: PeftFiles) -> dict[str, torch.Tensor]:
    """Module name -> prototype (d_in,) for every module the adapter adapts."""
    return {module: top_right_singular_vector(ab["A"].float(), ab["B"].float())
            for module, ab in sorted(lora_factors(files).items())}


def library_prototypes(library: "Library", name: str) -> dict[str, torch.Tensor]:
    """An adapter's prototypes, from the library's cache when its weights are unchanged."""
    from safetensors.torch import load_file, save_file

    spec = library.get(name)
    digest = spec.files.get(WEIGHTS_FILE, "")[:16]
    cache = library.path / CACHE_DIR
    path = cache / f"{name}-{digest}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache file is only a cache: recompute it
            pass
    library.check_files(name)
    protos = adapter_prototypes(read_peft_dir(library.adapter_dir(name)))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{path.name}.tmp"
    save_file({k: v.contiguous() for k, v in protos.items()}, str(tmp), metadata={"adapter": name, "sha256": digest})
    os.replace(tmp, path)  # atomic
    for stale in cache.glob(f"{name}-*.safetensors"):  # older versions of this adapter
        if stale != path and stale.name.rsplit("-", 1)[0] == name:
            stale.unlink(missing_ok=True)
    return protos
