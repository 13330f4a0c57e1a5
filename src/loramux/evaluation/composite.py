"""Score tasks when every example has its own adapter mixture (routed, oracle, base, ...).

The fused model applies one mixture per forward here: examples are grouped by their mixture and
each group is scored by `score_task` with that mixture active (the scorer's batches expand rows
for the choices, so a per-row mixture would not line up). Scoring is deterministic, so a
(task, example, mixture) already scored under one policy is reused by another: when a router
picks exactly the oracle's adapter, that example is scored once for both.

With `cache_dir`, predictions also go to disk (one JSON line each, appended as groups finish) and
are read back by later scorers over the same model: a killed benchmark resumes where it stopped,
and benchmarks that score the same (example, mixture) share the work. The file is named by what
decides a prediction: the base model's fingerprint, each loaded adapter's weights (sha256), the
batch size, and the code and library versions on that path (`_code_digest`). Routers persist only when they
carry a `cache_key` (Arrow over library prototypes, MoLE gates loaded from disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
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

    def __init__(self, fused: "FusedModel", *, batch_size: int = 8, progress: bool = True,
                 cache_dir: str | Path | None = None):
        self.fused, self.batch_size, self.progress = fused, batch_size, progress
        self.memo: dict[tuple[str, int, MixtureKey], Prediction] = {}
        self.forward_groups = 0
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.from_disk = 0  # predictions read back instead of computed
        self._disk: tuple[Path, dict] | None = None  # (file, {(task id, index, persistent key): Prediction})
        self._task_ids: dict[int, tuple[Task, str]] = {}

    # ------------------------------------------------------------------ the disk cache
    def _disk_file(self) -> Path | None:
        """The cache file for the current model and adapters, or None when any part has no identity."""
        if self.cache_dir is None or any(self.fused.identities.get(a) is None for a in self.fused.adapters):
            return None
        context = json.dumps({"base": self.fused.base.fingerprint, "numerics": _numerics(self.fused.base),
                              "batch_size": self.batch_size, "code": _code_digest(),
                              "adapters": [[a, self.fused.identities[a]] for a in self.fused.adapters]})
        return self.cache_dir / f"{hashlib.sha256(context.encode()).hexdigest()[:32]}.jsonl"

    def _stored(self) -> dict | None:
        path = self._disk_file()
        if path is None:
            return None
        if self._disk is None or self._disk[0] != path:
            entries: dict = {}
            if path.is_file():
                for line in path.read_text().splitlines():
                    try:  # a line cut short by a crash is skipped, not fatal
                        e = json.loads(line)
                        p = e["prediction"]
                        entries[(e["task"], e["index"], e["mixture"])] = Prediction(**p | {"targets": tuple(p["targets"])})
                    except (ValueError, KeyError, TypeError):
                        continue
            self._disk = (path, entries)
        return self._disk[1]

    def _task_id(self, task: Task) -> str:
        """The task's name and a digest of its examples (a file edited in place is another task)."""
        known = self._task_ids.get(id(task))
        if known is None or known[0] is not task:
            digest = hashlib.sha256(repr((task.kind, task.examples)).encode()).hexdigest()[:16]
            known = self._task_ids[id(task)] = (task, f"{task.name}|{digest}")
        return known[1]

    @staticmethod
    def _persistent_key(mix) -> str | None:
        if mix is None or not hasattr(mix, "layer_mixture"):
            return json.dumps(_key(mix))
        return getattr(mix, "cache_key", None)

    def _save(self, task: Task, pkey: str, rows: list[int], predictions: list[Prediction]) -> None:
        stored = self._stored()
        if stored is None:
            return
        tid = self._task_id(task)
        lines = []
        for i, pred in zip(rows, predictions):
            stored[(tid, i, pkey)] = pred
            lines.append(json.dumps({"task": tid, "index": i, "mixture": pkey, "prediction": dataclasses.asdict(pred)}))
        self._disk[0].parent.mkdir(parents=True, exist_ok=True)
        with open(self._disk[0], "a") as f:  # whole lines, appended: earlier groups survive a crash
            f.write("".join(line + "\n" for line in lines))

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
        stored = self._stored()
        for i, mix in zip(indices, mixtures):
            if (task.name, i, _key(mix)) in self.memo:
                continue
            pkey = self._persistent_key(mix) if stored is not None else None
            hit = stored.get((self._task_id(task), i, pkey)) if pkey is not None else None
            if hit is not None:
                self.memo[(task.name, i, _key(mix))] = hit
                self.from_disk += 1
            else:
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
            pkey = self._persistent_key(router if router is not None else (None if key is None else dict(key)))
            if pkey is not None:
                self._save(task, pkey, rows, result.predictions)
        return [self.memo[(task.name, i, _key(mix))] for i, mix in zip(indices, mixtures)]


_CODE_DIGEST: str | None = None


def _numerics(base) -> str:
    """The base's dtype and quantization: the fingerprint is the same for all of them (an adapter
    applies to each), their predictions are not."""
    import torch

    dtype = next((p.dtype for p in base.model.parameters() if p.is_floating_point()), torch.float32)
    quant = getattr(base, "quantization", "none")
    return str(dtype).removeprefix("torch.") + ("" if quant == "none" else f"+{quant}")


def _code_digest() -> str:
    """A digest of what turns a (prompt, mixture) into a prediction: the scoring, prompt-formatting,
    fused-layer, in-forward-router and engine code, and the torch and transformers versions.
    Changing any of it starts a new cache file instead of reusing stale answers."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        import torch
        import transformers

        root = Path(__file__).resolve().parents[1]
        # the harness (which strategies, which samples) and the gates' training loop (train.py: it
        # writes gates, whose own digest is part of their cache key) are not on that path: their
        # edits keep the cache
        files = [root / "padding.py", root / "training" / "batching.py", root / "routers" / "layerwise.py",
                 *(root / "evaluation" / f for f in ("composite.py", "metrics.py", "scoring.py")),
                 *(f for d in ("data", "fusion", "engine", "routers/arrow", "routers/gating")
                   for f in sorted((root / d).glob("*.py")) if f != root / "routers" / "gating" / "train.py")]
        h = hashlib.sha256(f"{torch.__version__}|{transformers.__version__}".encode())
        for f in files:
            h.update(f.read_bytes())
        _CODE_DIGEST = h.hexdigest()[:16]
    return _CODE_DIGEST


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
