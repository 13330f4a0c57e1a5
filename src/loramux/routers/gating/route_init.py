"""Starting MoLE gates as routers (`MoleTrainConfig.route_init_per_task`; loramux's addition).

The routing term (train.py) asks every gate to put its weight on the prompt's own adapter. In the
main loop it is one term beside the answer loss and the balance loss, at the small learning rate
the paper's gate needs, and a run that stops when the validation answer loss flattens has seen
under half of the training examples, each once. 14-adapter gates trained that way put their largest weight on
the own adapter in about half the units, and score well below the oracle (docs/routing.md, MoLE).

Each unit's gate is a classifier over its own input pooled over the prompt, so the routing term
can be fitted unit by unit, on inputs recorded once:

1. Run `per_task` training prompts of every owned task through the fused model with the prompt's
   own adapter alone: the forward that gates which route would give. Record each unit's input,
   pooled over the prompt as the gate pools it at prefill.
2. Fit each unit's projection to −log w[own] on those inputs, full batch, on standardised
   features, then fold the standardisation into the projection (`fit_gates`). The LayerNorm and
   the temperature stay at their start.

The main loop starts from these gates, and scores them first (step 0) on the validation examples.
A run whose answer loss never improves on them keeps them.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Callable

import torch

from .gates import MoleGates, pool

if TYPE_CHECKING:
    from ...data import Example
    from ...fusion import FusedModel

# Full batch, so a larger step than the main loop's (whose 1e-4 suits noisy batches of 8, train.py).
FIT_STEPS = 100
FIT_LR = 1e-3
# How the start is fitted, stored with it: gates fitted another way are another recipe.
# "standardized": each feature of the normalised outputs is centred and scaled over the fitted
# prompts before the fit. Without it (the LayerNorm and projection fitted directly, "direct"), on the
# 14-task library the fit had not converged at 100 steps: on prompts held out from it, a unit's
# largest weight was on the own adapter for 0.87 of them (0.94 at 300 steps, and no better on the
# fitted prompts, so under-fitted, not over-fitted). The pooled prompts share the chat template and
# most of their content's direction, so what tells tasks apart is a small part of each feature's
# spread: an ill-conditioned problem for a gradient step. Standardised, 100 steps give 0.99 on the
# held-out prompts, at a third of the time per unit (the LayerNorm needs no backward).
ROUTE_FIT = "standardized"
_STD_EPS = 1e-3  # added to each feature's spread: a feature constant over the prompts is not blown up


def sample_owned(labelled: list[tuple["Example", str]], own: list[int], per_task: int,
                 seed: int) -> list[int]:
    """Indices into `labelled` of up to `per_task` seeded examples of each task that has an own
    adapter (own >= 0)."""
    by_task: dict[str, list[int]] = {}
    for i, ((_, task), k) in enumerate(zip(labelled, own)):
        if k >= 0:
            by_task.setdefault(task, []).append(i)
    picked = []
    for task, idx in sorted(by_task.items()):
        picked += sorted(random.Random(f"{seed}:route-init:{task}").sample(idx, min(per_task, len(idx))))
    return picked


@torch.no_grad()
def record_pooled(gates: MoleGates, fused: "FusedModel", prompts: list[list[int]], own: list[int],
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Unit -> (N, d) its input pooled over each prompt, with each prompt's own adapter alone
    active (fused slot own[i], weight 1) in every adapted module."""
    from ...fusion import LayerMixture
    from ..layerwise import forward_prompts, token_batch

    # allocated once, before the forwards: thousands of small pooled tensors kept between the
    # forwards' large transient ones fragment the CPU heap (RSS grew ~25 MB per prompt)
    pooled = {u: torch.empty(len(prompts), fused.layers[gates.anchor[u]].base.in_features) for u in gates.units}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    rows = onehot = None

    def gate(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        unit = gates.unit.get(name)
        if unit is not None and gates.anchor[unit] == name:
            pooled[unit][rows] = pool(x, mask).float().cpu()
        return onehot.to(x.dtype)

    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        rows = torch.tensor(batch)
        ids, mask = token_batch(fused, [prompts[i] for i in batch])
        onehot = torch.zeros(len(batch), len(fused.adapters), device=ids.device)
        onehot[torch.arange(len(batch)), torch.tensor([own[i] for i in batch])] = 1.0
        forward_prompts(fused, LayerMixture(gate), ids, mask)
    return pooled


def fit_gates(gates: MoleGates, fused: "FusedModel", pooled: dict[str, torch.Tensor], own: torch.Tensor, *,
              steps: int = FIT_STEPS, lr: float = FIT_LR) -> dict[str, float]:
    """Fit each unit's projection to −log w[own] on its pooled inputs (full batch, Adam, from zero)
    on standardised features; `own` indexes the gated adapters, which are the fused model's slots
    (as in training). The gate computes logits = P·LN(E(x)) / τ; with h = LN(E(x)) at the
    LayerNorm's start, mean μ and spread σ over the prompts, the fit learns W, b on (h − μ) / σ and
    stores P = τ·W / σ, bias τ·(b − W·μ / σ): the same logits, in the gate's own form.
    Returns unit -> the share of the inputs whose largest weight is on their own adapter."""
    share = {}
    device = gates.log_tau.device
    own = own.to(device)
    for unit in gates.units:
        i = gates.index[unit]
        layer = fused.layers[gates.anchor[unit]]
        proj = gates.projs[i]
        with torch.no_grad():
            h = gates.norms[i](gates.features(unit, pooled[unit].to(device), layer)).flatten(1)
            mu, sd = h.mean(0), h.std(0, correction=0) + _STD_EPS  # one prompt: spread 0, not NaN
            z = (h - mu) / sd
            del h
        W = torch.zeros_like(proj.weight, requires_grad=True)
        b = torch.zeros_like(proj.bias, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(z, W, b), own)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            tau = gates.log_tau[i].exp()
            proj.weight.copy_(tau * W / sd)
            proj.bias.copy_(tau * (b - W @ (mu / sd)))
            x = pooled[unit].to(device)[:, None, :]  # (N, 1, d): pooling one position is the identity
            share[unit] = float((gates.logits(unit, x, None, layer).argmax(-1) == own).float().mean())
    return share


def route_init(gates: MoleGates, fused: "FusedModel", prompts: list[list[int]], own: list[int], *,
               batch_size: int, log: Callable[[str], None] = print) -> dict:
    """Steps 1 and 2 of the module docstring on `prompts` (token ids) whose own adapters (fused
    slots, the gated adapters in order) are `own`. Returns what to keep in the router's info."""
    started = time.perf_counter()
    log(f"mole: recording {len(prompts)} prompts' pooled inputs with their own adapters")
    pooled = record_pooled(gates, fused, prompts, own, batch_size)
    recorded = time.perf_counter() - started
    log(f"mole: fitting {len(gates.units)} gates to route ({FIT_STEPS} full-batch steps each, {ROUTE_FIT})")
    with torch.enable_grad():
        share = fit_gates(gates, fused, pooled, torch.tensor(own), steps=FIT_STEPS, lr=FIT_LR)
    mean = sum(share.values()) / max(1, len(share))
    log(f"mole: route init done in {time.perf_counter() - started:.0f}s; own adapter top on the fitted "
        f"prompts in {mean:.3f} of (prompt, unit) pairs")
    return {"prompts": len(prompts), "fit": ROUTE_FIT, "fit_steps": FIT_STEPS, "fit_lr": FIT_LR,
            "train_own_top_share": round(mean, 4),
            "record_seconds": round(recorded, 1), "seconds": round(time.perf_counter() - started, 1)}
