"""Abstention for the in-forward routers (Arrow, MoLE): the library's DLP out-of-library test in front.

Arrow routes each token to the adapter whose prototype its hidden state aligns with most (arXiv
2405.11157); MoLE's gates weigh every adapter in every layer (arXiv 2404.13628). Neither has a way
to say that no adapter fits: their weights always sum to one, and their own confidence separates
in-library from out-of-library prompts poorly (AUROC 0.74 for both, docs/routing.md, section
"Abstention"). The stored DLP router's energy test is calibrated for exactly that decision, on
validation prompts alone, so a prompt it rejects goes to the base model and every other prompt to
the in-forward router unchanged. The test costs one sentence-encoder pass per prompt, before the
forward; the forward itself is untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .routing import Routing

if TYPE_CHECKING:
    from ..library import Library
    from ..models import BaseModel
    from .sentence import DlpRouter


def stored_gate(library: "Library", name: str = "dlp", *, base: "BaseModel | None" = None) -> "DlpRouter | None":
    """The library's stored DLP router when it carries an out-of-library test, else None."""
    if library.routers().get(name, {}).get("kind") != "dlp":
        return None
    from .sentence import DlpRouter

    router = DlpRouter.load(library, name, base=base)
    return router if router.abstain is not None else None


def gated(gate: "DlpRouter | None", prompts: list[str], kind: str) -> list[Routing | None]:
    """Per prompt: an abstained Routing (the base model serves it) where `gate`'s stored test says
    no adapter fits, or None where the in-forward router `kind` serves it. No gate: all None."""
    if gate is None or not prompts:
        return [None] * len(prompts)
    return [Routing((), (), {}, abstained=True, router=kind,
                    reason=f"{why} (the library's {gate.kind} out-of-library test, in front of {kind})")
            if why else None for why in gate.out_of_library(prompts)]
