"""How far a difference between two strategies is from noise.

Two strategies scored on the same prompts differ prompt by prompt; their difference in the
task-averaged score has a sampling error that a few dozen prompts per task make large (at 40
prompts a task, one prompt is 2.5 points of that task). `paired_bootstrap` resamples the prompts
of each task with replacement, the same draw for both strategies (paired), recomputes the
difference of the task-averaged scores, and reports its percentile interval (Efron & Tibshirani,
An Introduction to the Bootstrap, 1993, ch. 13). Tasks are resampled separately (stratified), as
the average weighs every task equally whatever its size.
"""

from __future__ import annotations

import numpy as np

from ..errors import LoramuxError


def paired_bootstrap(a: dict[str, list[float]], b: dict[str, list[float]], *, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Task-averaged score of `a` minus that of `b` (per-prompt scores, e.g. 1/0 correct, in the
    same prompt order per task), in points, with its bootstrap interval:
    {"difference", "low", "high", "confidence", "resamples", "p_not_above_zero"}
    (`p_not_above_zero`: the share of resamples whose difference is <= 0, a reading of the
    bootstrap distribution, not a test's p-value)."""
    if set(a) != set(b) or not a:
        raise LoramuxError(f"paired scores need the same, non-empty tasks; got {sorted(a)} and {sorted(b)}")
    if not 0 < confidence < 1 or resamples < 1:
        raise LoramuxError("confidence must be in (0, 1) and resamples >= 1")
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    point = 0.0
    for task in sorted(a):
        if len(a[task]) != len(b[task]) or not a[task]:
            raise LoramuxError(f"task {task!r}: the two strategies have {len(a[task])} and {len(b[task])} scores")
        d = np.asarray(a[task], dtype=float) - np.asarray(b[task], dtype=float)
        point += d.mean()
        diffs += d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    n = len(a)
    point, diffs = 100 * point / n, 100 * diffs / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"difference": round(float(point), 2), "low": round(float(low), 2), "high": round(float(high), 2),
            "confidence": confidence, "resamples": resamples,
            "p_not_above_zero": round(float((diffs <= 0).mean()), 4)}
