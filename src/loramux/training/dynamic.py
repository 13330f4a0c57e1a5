"""Dynamic LoRA (ALGORITHMS.md §3, arXiv 2501.14859; only its abstract is public).

loramux's reading, each part switchable so its effect can be measured against plain LoRA:

* **Layer importance**: per adapted module, an exponential moving average of the sensitivity
  |θ ⊙ ∇θ| of its active LoRA parameters (as in AdaLoRA), per rank component and summed.
* **Reallocation**: each module has room for `max_rank_factor × r` rank components of which
  exactly r start active. Every `realloc_every` steps (after warm-up), within each group of
  same-shaped modules (e.g. all q_proj across layers) the active components are redistributed
  in proportion to module importance (at least `min_rank` each): a module that loses rank masks
  its least important components, one that gains unmasks components with a zeroed B column (so
  the model's output does not jump). The group's total rank, and so the parameter count, stays
  that of the plain LoRA (r per module).
* **Input-adaptive scaling**: per module a gate g(x) = 2·sigmoid(w·x + b) per token scales the
  update; w = 0, b = 0 at the start, so step 0 equals plain LoRA. d_in + 1 parameters and one dot
  product per token per module (~0.1-0.5% of the module's FLOPs).

The result is saved as a PEFT LoRA: active components only, `rank_pattern` with each module's
final rank and `alpha_pattern` keeping alpha/r_l equal to the training scale alpha/r. Gates ride
in the same safetensors file as `lora_gate.weight`/`.bias` (PEFT ignores them and then computes
the update without the gate; loramux's fused layer applies them).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data import PromptFormatter, Task
from ..errors import LoramuxError
from ..library.checks import PeftFiles
from ..library.spec import TrainingSummary
from .batching import LazyFeatures, answer_loss, collate_left, micro_batch_indices
from .config import LoraTrainConfig

if TYPE_CHECKING:
    from ..models import BaseModel


@dataclass(frozen=True)
class DynamicConfig:
    realloc: bool = True  # importance-driven rank reallocation
    input_gate: bool = True  # per-token input gate on each module's update
    realloc_every: int = 10  # steps between reallocations
    realloc_start: int | None = None  # first reallocation step (default: after warm-up)
    realloc_stop: float = 0.8  # no reallocation in the last 20% of steps (let the final ranks settle)
    ema: float = 0.85  # importance EMA factor
    max_rank_factor: int = 2  # room per module: this many times r
    min_rank: int = 1

    def __post_init__(self) -> None:
        if self.realloc_every < 1 or self.max_rank_factor < 1 or self.min_rank < 0:
            raise LoramuxError(f"realloc_every and max_rank_factor must be >= 1, min_rank >= 0; got {self}")
        if not 0 <= self.ema < 1 or not 0 < self.realloc_stop <= 1:
            raise LoramuxError(f"ema must be in [0, 1) and realloc_stop in (0, 1]; got {self.ema}, {self.realloc_stop}")


class DynamicLoraLinear(nn.Module):
    """A frozen linear layer + a LoRA with a rank mask and an optional per-token input gate."""

    def __init__(self, base: nn.Linear, rank: int, room: int, scaling: float, gate: bool):
        super().__init__()
        self.base = base
        d_in, d_out = base.in_features, base.out_features
        # fp32 factors and gate whatever the base's dtype, as PEFT keeps LoRA weights (fusion/layer.py)
        on = dict(dtype=torch.float32, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(room, d_in, **on))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default LoRA init
        self.lora_B = nn.Parameter(torch.zeros(d_out, room, **on))
        self.register_buffer("mask", (torch.arange(room, device=base.weight.device) < rank).float())
        self.scaling = scaling
        self.gate = nn.Linear(d_in, 1, **on) if gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.register_buffer("importance", torch.zeros(room, device=base.weight.device))  # per component EMA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.lora_A.dtype)  # the update in fp32, added before one rounding (PEFT's order)
        delta = ((xf @ self.lora_A.T) * self.mask) @ self.lora_B.T * self.scaling
        if self.gate is not None:
            delta = delta * (2 * torch.sigmoid(self.gate(xf)))
        return (self.base(x) + delta).to(x.dtype)

    @property
    def rank(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def update_importance(self, beta: float) -> None:
        """EMA of |θ ⊙ ∇θ| per rank component (row of A + column of B), active ones only."""
        if self.lora_A.grad is None:
            return
        s = (self.lora_A * self.lora_A.grad).abs().sum(1) + (self.lora_B * self.lora_B.grad).abs().sum(0)
        self.importance.mul_(beta).add_((1 - beta) * s * self.mask)

    @torch.no_grad()
    def set_rank(self, target: int) -> None:
        active = self.mask.bool()
        have = int(active.sum())
        if target < have:  # mask the least important active components
            score = torch.where(active, self.importance, torch.full_like(self.importance, math.inf))
            self.mask[score.argsort()[: have - target]] = 0
        elif target > have:  # unmask inactive ones, B column zeroed so the output does not jump
            grow = (~active).nonzero().flatten()[: target - have]
            self.lora_B[:, grow] = 0
            self.mask[grow] = 1
            self.importance[grow] = self.importance[active].mean() if have else 0


def allocate(importance: list[float], total: int, low: int, high: int) -> list[int]:
    """Integer ranks in [low, high] summing to `total`, in proportion to importance: spare ranks
    are handed out by weight among modules below the cap, then one by one by largest quota."""
    n = len(importance)
    if not n * low <= total <= n * high:
        raise LoramuxError(f"cannot spread {total} ranks over {n} modules within [{low}, {high}]")
    weights = [max(float(i), 0.0) for i in importance]
    ranks = [low] * n
    free = total - n * low
    while free > 0:
        open_ = [j for j in range(n) if ranks[j] < high]
        mass = sum(weights[j] for j in open_)
        quota = {j: free * (weights[j] / mass if mass > 0 else 1 / len(open_)) for j in open_}
        added = 0
        for j in open_:
            step = min(high - ranks[j], int(quota[j]))
            ranks[j] += step
            added += step
        if added == 0:
            for j in sorted(open_, key=lambda j: -quota[j])[:free]:
                ranks[j] += 1
                added += 1
        free -= added
    return ranks


def plot_allocation(ranks: dict[str, int], importance: dict[str, float], path) -> None:
    """PNG: final rank and importance, layers (rows) x module kinds (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import re

    def where(name: str) -> tuple[int, str]:
        m = re.search(r"\.(\d+)\.", name)
        return (int(m.group(1)) if m else 0), name.rsplit(".", 1)[-1]

    layers = sorted({where(n)[0] for n in ranks})
    kinds = list(dict.fromkeys(where(n)[1] for n in ranks))
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.1 * len(kinds) * 2, 1.5 + 0.22 * len(layers)))
    for ax, values, title in ((axes[0], ranks, "final rank"), (axes[1], importance, "importance (EMA |θ·∇θ|)")):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for n, v in values.items():
            l, k = where(n)
            grid[layers.index(l), kinds.index(k)] = v
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inject(model: nn.Module, config: LoraTrainConfig, dyn: DynamicConfig) -> dict[str, DynamicLoraLinear]:
    layers = {}
    scaling = config.alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
    room = config.rank * (dyn.max_rank_factor if dyn.realloc else 1)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in config.target_modules and isinstance(child, nn.Linear):
                layer = DynamicLoraLinear(child, config.rank, room, scaling, dyn.input_gate)
                setattr(module, child_name, layer)
                layers[f"{name}.{child_name}" if name else child_name] = layer
    if not layers:
        raise LoramuxError(f"no linear modules named {list(config.target_modules)} in the model")
    return layers


def eject(model: nn.Module, layers: dict[str, DynamicLoraLinear]) -> None:
    """Put the plain base layers back."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)


def reallocate(layers: dict[str, DynamicLoraLinear], rank: int, dyn: DynamicConfig) -> None:
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():  # same shape and kind: moving rank keeps the parameter count
        groups.setdefault((name.rsplit(".", 1)[-1], tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), []).append(name)
    for names in groups.values():
        imp = [float(layers[n].importance.sum()) for n in names]
        room = layers[names[0]].lora_A.shape[0]
        for n, r in zip(names, allocate(imp, rank * len(names), min(dyn.min_rank, rank), room)):
            layers[n].set_rank(r)


@dataclass
class DynamicResult:
    files: PeftFiles
    summary: TrainingSummary
    ranks: dict[str, int]
    importance: dict[str, float]
    losses: list[float]


def export(layers: dict[str, DynamicLoraLinear], config: LoraTrainConfig, dyn: DynamicConfig) -> tuple[PeftFiles, dict]:
    """Active components only, as a PEFT LoRA with rank/alpha patterns (+ gate tensors)."""
    from pathlib import Path

    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in layers.items():
        keep = layer.mask.bool()
        r = int(keep.sum())
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach()[keep].contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach()[:, keep].contiguous().cpu()
        if layer.gate is not None:
            tensors[f"{prefix}.lora_gate.weight"] = layer.gate.weight.detach().contiguous().cpu()
            tensors[f"{prefix}.lora_gate.bias"] = layer.gate.bias.detach().contiguous().cpu()
        if r != config.rank:
            rank_pattern[name] = r
            # keep alpha_l / r_l equal to the training scale alpha / r (or / sqrt for rsLoRA)
            alpha_pattern[name] = (config.alpha * (math.sqrt(r / config.rank) if config.use_rslora else r / config.rank))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "target_modules": list(config.target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": config.use_rslora, "init_lora_weights": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }
    return PeftFiles(config=peft_config, tensors=tensors, metadata={}, path=Path("<dynamic lora>")), \
        {"dynamic": asdict(dyn)}


def train_dynamic(base: "BaseModel", tasks: list[Task] | Task, config: LoraTrainConfig | None = None,
                  dyn: DynamicConfig = DynamicConfig(), *, progress: bool = True) -> DynamicResult:
    """Train a Dynamic LoRA on the union of `tasks`; `base.model` is left as it was."""
    from tqdm.auto import tqdm

    from .lora import _lr_lambda

    config = (config or LoraTrainConfig()).resolved(base)
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    examples = [ex for t in tasks for ex in t.examples]
    if not examples:
        raise LoramuxError(f"no training examples in task(s) {[t.name for t in tasks]}")
    formatter = PromptFormatter(base.tokenizer)
    features = LazyFeatures(formatter, examples, config.max_seq_len)
    model = base.model
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    layers = inject(model, config, dyn)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        start = dyn.realloc_start if dyn.realloc_start is not None else max(config.warmup_steps, dyn.realloc_every)
        stop = int(dyn.realloc_stop * config.steps)
        device = next(model.parameters()).device
        losses, history = [], []
        model.train()
        started = time.perf_counter()
        data = ",".join(f"{t.name}({len(t)})" for t in tasks)
        bar = tqdm(range(config.steps), desc=f"train dynamic {data}"[:60], disable=not progress, unit="step")
        for step in bar:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accum):
                idx = micro_batch_indices(len(features), config.batch_size, step * config.grad_accum + micro, config.seed)
                inputs, labels = collate_left([features[i] for i in idx], base.tokenizer.pad_token_id)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                logits = model(**inputs, logits_to_keep=labels.shape[1] + 1).logits
                loss = answer_loss(logits, labels.to(device)) / config.grad_accum
                loss.backward()
                total += loss.item()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            for layer in layers.values():
                layer.update_importance(dyn.ema)
            opt.step()
            sched.step()
            losses.append(total)
            done = step + 1
            if dyn.realloc and start <= done < stop and (done - start) % dyn.realloc_every == 0:
                reallocate(layers, config.rank, dyn)
                history.append({"step": done, "ranks": {n: l.rank for n, l in layers.items()}})
            bar.set_postfix(loss=f"{total:.3f}")
        bar.close()
        model.eval()
        seconds = time.perf_counter() - started
        files, extra = export(layers, config, dyn)
        ranks = {n: l.rank for n, l in layers.items()}
        importance = {n: round(float(l.importance.sum()), 8) for n, l in layers.items()}
    finally:
        eject(model, layers)
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
    tail = losses[-10:]
    extra["dynamic"].update({"ranks": ranks, "importance": importance, "reallocations": len(history)})
    summary = TrainingSummary(steps=config.steps, final_loss=round(sum(tail) / len(tail), 4), seconds=round(seconds, 1),
                              data=data, examples=len(examples), seed=config.seed,
                              config={**config.to_dict(), "method": "dynamic", **extra})
    return DynamicResult(files, summary, ranks, importance, losses)
