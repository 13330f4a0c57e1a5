"""Score tasks when every example has its own adapter mixture (routed, oracle, base, ...).

The fused model applies one mixture per forward here: examples are grouped by their mixture and
each group is scored by `score_task` with that mixture active (the scorer's batches expand rows
for the choices, so a per-row mixture would not line up). Scoring is deterministic, so a
(task, example, mixture) already scored under one policy is reused by another: when a router
picks exactly the oracle's adapter, that example is scored once for both.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from ..data import Task
from .scoring import Prediction, answer_budget, score_task

if TYPE_CHECKING:
    from ..fusion import FusedModel

Mixture = "dict[str, float] | None | InForwardRouter"  # a fixed mixture, the base, or an in-forward router
MixtureKey = tuple


def _key(mix) -> MixtureKey | None:
    if mix is None:
        return None
    if hasattr(mix, "layer_mixture"):  # Arrow: weights come from each layer's input
        return ("router", mix.kind, id(mix))
    return tuple(sorted((k, round(float(v), 6)) for k, v in mix.items()))


class MixtureScorer:
    """Scores (task, example index, mixture) triples through one FusedModel, with a memo."""

    def __init__(self, fused: "FusedModel", *, batch_size: int = 8, progress: bool = True):
        self.fused, self.batch_size, self.progress = fused, batch_size, progress
        self.memo: dict[tuple[str, int, MixtureKey], Prediction] = {}
        self.forward_groups = 0

    def _engine_greedy(self, router):
        from ..engine import Engine, GenerationRequest, SamplingParams

        engine = Engine(self.fused.base, fused=self.fused)

        def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
            sampling = SamplingParams(max_new_tokens=max_new_tokens)
            return [r.text for r in engine.generate([GenerationRequest(p, sampling=sampling) for p in prompts],
                                                    router=router)]
        return generate

    def _mixture(self, key, router):
        if key is None:
            return None
        if router is not None:
            return router.layer_mixture()
        return self.fused.sequence_mixture([dict(key)])

    def score(self, task: Task, mixtures: list[Mixture], indices: list[int] | None = None) -> list[Prediction]:
        """Predictions for `task.examples[indices[j]]` under `mixtures[j]`, in that order."""
        indices = list(range(len(task.examples))) if indices is None else list(indices)
        assert len(indices) == len(mixtures)
        todo: dict[MixtureKey, list[int]] = {}
        for i, mix in zip(indices, mixtures):
            if (task.name, i, _key(mix)) not in self.memo:
                todo.setdefault(_key(mix), []).append(i)
        # The budget comes from the whole task, so an example decodes alike in any group.
        budget = answer_budget(self.fused.base.tokenizer, task.examples) if task.kind == "generative" else None
        for key, rows in todo.items():
            rows = sorted(set(rows))
            subset = dataclasses.replace(task, examples=tuple(task.examples[i] for i in rows))
            router = mixtures[indices.index(rows[0])] if key and key[0] == "router" else None
            mix = self._mixture(key, router)
            hooks = {}
            if router is not None and getattr(router, "granularity", "token") == "layer":
                # MoLE: gates pool the prompt; cached choices and decode steps reuse its weights
                hooks = {"prompt_router": router, "generate": self._engine_greedy(router)}
            try:
                with self.fused.mixture(mix):
                    result = score_task(self.fused.base.model, self.fused.base.tokenizer, subset,
                                        batch_size=self.batch_size, progress=self.progress,
                                        max_new_tokens=budget, **hooks)
            finally:
                if router is not None and hasattr(router, "release"):
                    router.release()
            self.forward_groups += 1
            for i, pred in zip(rows, result.predictions):
                self.memo[(task.name, i, key)] = pred
        return [self.memo[(task.name, i, _key(mix))] for i, mix in zip(indices, mixtures)]


def compare_policies(scorer: MixtureScorer, tasks: list[Task], policies: dict[str, Callable[[Task, list[int]], list[Mixture]]],
                     indices: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """Per-policy, per-task accuracy. A policy maps (task, example indices) to one mixture each."""
    out: dict[str, dict] = {}
    for name, policy in policies.items():
        per_task = {}
        for task in tasks:
            idx = indices[task.name] if indices else list(range(len(task.examples)))
            preds = scorer.score(task, policy(task, idx), idx)
            per_task[task.name] = sum(p.correct for p in preds) / max(1, len(preds))
        out[name] = {"per_task": per_task, "average": sum(per_task.values()) / max(1, len(per_task))}
    return out
