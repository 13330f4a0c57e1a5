"""Routers decide which adapters serve a prompt, and with what weights; they never touch the
base model's tensors. Each returns `Routing` values that the fused engine applies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LoramuxError
from .routing import Routing, fusion_weights, top_p_select

if TYPE_CHECKING:
    from ..fusion import FusedModel
    from ..library import Library
    from ..models import BaseModel

METHODS = ("dlp", "arrow", "mole")


def load_router(library: "Library", method: str = "dlp", *, name: str | None = None,
                base: "BaseModel | None" = None, fused: "FusedModel | None" = None, **config):
    """A router over `library`: a trained one stored in it (dlp, under `name`, default the method),
    or Arrow, which needs no training and routes between the adapters loaded in `fused` but the
    library's general adapter (when none are loaded, every library adapter is loaded)."""
    if method == "arrow":
        from .arrow import ArrowConfig, ArrowRouter

        if fused is None:
            raise LoramuxError("the arrow router works inside a fused model; pass fused= (e.g. Engine(...).fused)")
        if not fused.adapters:
            for adapter in library.names():
                fused.load(library, adapter)
        return ArrowRouter(fused, library, ArrowConfig(**config))
    if method == "mole":
        from .gating import MoleRouter

        if fused is None:
            raise LoramuxError("the mole router works inside a fused model; pass fused= (e.g. Engine(...).fused)")
        return MoleRouter.load(library, fused, name or method, mask=tuple(config.pop("mask", ()) or ()))
    if method == "dlp":
        from dataclasses import replace

        from .sentence import DlpRouter

        router = DlpRouter.load(library, name or method, base=base)
        if config:
            router.config = replace(router.config, **config)
        return router
    raise LoramuxError(f"unknown router method {method!r}; available: {list(METHODS)}")


__all__ = ["Routing", "top_p_select", "fusion_weights", "load_router", "METHODS"]
