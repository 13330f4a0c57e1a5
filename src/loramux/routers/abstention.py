"""Abstention for the in-forward routers (Arrow, MoLE): the library's DLP out-of-library test in front.

Arrow routes each token to the adapter whose prototype its hidden state aligns with most (arXiv
2405.11157); MoLE's gates weigh every adapter in every layer (arXiv 2404.13628). Neither has a way
to say that no adapter fits: their weights always sum to one, and their own confidence separates
in-library from out-of-library prompts poorly (AUROC 0.74 for both, docs/routing.md, section 2).
The stored DLP router's energy test is calibrated for exactly that decision, on validation
prompts alone, so a prompt it rejects goes to the library's general adapter (the base model when
it names none) and every other prompt to the in-forward router unchanged. The test costs one sentence-encoder pass per prompt, before the
forward; the forward itself is untouched.

A test is used only in front of a router over the same adapters it was set for: after the library
grows, the old test would send the new adapter's prompts away from it, so until the DLP
router is retrained the in-forward router serves every prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .routing import Routing

if TYPE_CHECKING:
    from ..library import Library
    from ..models import BaseModel
    from .sentence import DlpRouter


def in_forward(router: Any) -> bool:
    """Whether the router sets its weights inside the forward (Arrow, MoLE) rather than per prompt."""
    return getattr(router, "granularity", "sequence") != "sequence"


def stored_test(library: "Library", name: str = "dlp", *, base: "BaseModel | None" = None) -> "DlpRouter | None":
    """The library's stored DLP router when it carries an out-of-library test, else None. Raises
    (LoramuxError) when the stored router cannot be used, e.g. trained for other adapters."""
    if library.routers().get(name, {}).get("kind") != "dlp":
        return None
    from .sentence import DlpRouter

    router = DlpRouter.load(library, name, base=base)
    return router if router.abstain is not None else None


def routed(router: Any) -> list[str]:
    """The adapters an in-forward router chooses between (Arrow: its candidates; MoLE: its gated
    ones; else every adapter loaded in its fused model)."""
    for chosen in (getattr(router, "candidates", None), getattr(router, "adapters", None)):
        if chosen:
            return list(chosen)
    fused = getattr(router, "fused", None)
    return list(fused.adapters) if fused is not None else []


def applies(test: "DlpRouter | None", router: Any) -> bool:
    """Whether `test` may screen prompts for the in-forward `router`: set for the same adapters."""
    if test is None or test.abstain is None:
        return False
    return set(test.adapters) == set(routed(router))


def screen(test: "DlpRouter | None", prompts: list[str], router: Any) -> list[Routing | None]:
    """Per prompt: an abstained Routing (the library's general adapter or the base model serves it)
    where `test` says no adapter fits, or None where the in-forward `router` serves it. No test, or
    one set for other adapters (`applies`): all None."""
    if not prompts or not applies(test, router):
        return [None] * len(prompts)
    return [Routing((), (), {}, abstained=True, router=router.kind, general=test.general,
                    reason=f"{why} (the library's {test.kind} out-of-library test, in front of {router.kind})")
            if why else None for why in test.out_of_library(prompts)]
