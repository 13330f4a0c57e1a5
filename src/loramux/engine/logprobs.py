"""Log-probabilities of a prompt's own tokens under a mixture or an in-forward router: what the
server's `echo` + `logprobs` returns (and what lm-evaluation-harness scores multiple choice with).

Token j's entry is log p(ids[j] | ids[:j]); the first token has none (nothing predicts it), as in
OpenAI's completions API.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch

from .sampling import NonFiniteOutput

if TYPE_CHECKING:
    from ..routers.routing import Routing
    from .engine import Engine

Entry = tuple[int, "float | None", "dict[int, float] | None"]  # (token id, log p, top-N {id: log p})


@dataclasses.dataclass
class PromptScore:
    entries: list[Entry]
    routing: "Routing | None" = None  # what an in-forward router chose for the prompt's tokens


@torch.no_grad()
def prompt_logprobs(engine: "Engine", ids: list[int], mixture: dict[str, float] | None = None, *,
                    router=None, top_n: int | None = None) -> PromptScore:
    """Score `ids` in one forward. Must run on the thread that owns the fused model (the
    scheduler's `call`): it sets the fused layers' mixture for the length of the forward."""
    model, fused = engine.base.model, engine.fused
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    mask = torch.ones_like(x)
    routing = None
    try:
        with contextlib.ExitStack() as stack:
            recorder = stack.enter_context(router.recording(mask)) if router is not None else None
            mix = router.layer_mixture() if router is not None else engine.sequence_mixture([mixture])
            stack.enter_context(fused.mixture(mix, attention_mask=mask))
            logits = model(input_ids=x, attention_mask=mask).logits[0].float()  # (T, V)
        if recorder is not None:
            routing = router.routings(recorder)[0]
    finally:  # the fused layers' cached factors stay: the running batch's are still valid
        if router is not None and hasattr(router, "release"):
            router.release()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutput()
    logp = torch.log_softmax(logits, dim=-1)  # row j predicts token j + 1
    chosen = logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist()  # (T-1,)
    tops = logp[:-1].topk(top_n, dim=-1) if top_n else None
    entries: list[Entry] = [(ids[0], None, None)]
    for j in range(1, len(ids)):
        top = ({int(i): float(v) for i, v in zip(tops.indices[j - 1], tops.values[j - 1])}
               if tops is not None else None)
        entries.append((ids[j], chosen[j - 1], top))
    return PromptScore(entries, routing)
