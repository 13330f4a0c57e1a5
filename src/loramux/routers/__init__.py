"""Routers decide which adapters serve a prompt, and with what weights; they never touch the
base model's tensors. Each returns `Routing` values that the fused engine applies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LoramuxError
from .routing import Routing, fusion_weights, top_p_select

if TYPE_CHECKING:
    from ..library import Library
    from ..models import BaseModel

METHODS = ("dlp",)


def load_router(library: "Library", method: str = "dlp", *, name: str | None = None,
                base: "BaseModel | None" = None, **config):
    """Load a trained router of `method` stored in `library` (under `name`, default the method)."""
    if method == "dlp":
        from dataclasses import replace

        from .sentence import DlpRouter

        router = DlpRouter.load(library, name or method, base=base)
        if config:
            router.config = replace(router.config, **config)
        return router
    raise LoramuxError(f"unknown router method {method!r}; available: {list(METHODS)}")


__all__ = ["Routing", "top_p_select", "fusion_weights", "load_router", "METHODS"]
