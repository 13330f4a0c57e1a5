"""Train MoLE gates: base and LoRAs frozen, only gates and τ learn, on the library's tasks mixed.

Loss = task loss (answer tokens) + α · L_balance, with L_balance = −Σ_i log q_i and q_i the mean
gate weight of adapter i over all gated units and the batch (ALGORITHMS.md §2). It is computed
on the live gate outputs, so its gradient reaches the gates; the public MoLE code detaches it,
which makes it a constant.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from .gates import MoleConfig, MoleGates, gated_modules
from .router import MoleRouter

if TYPE_CHECKING:
    from ...data import Task
    from ...fusion import FusedModel


@dataclass(frozen=True)
class MoleTrainConfig:
    granularity: str = "layer"
    balance_alpha: float = 0.5  # α; 0 turns the balance loss off (the paper's ablation)
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        MoleConfig(self.granularity)  # validates the granularity
        if self.balance_alpha < 0:
            raise LoramuxError(f"balance_alpha must be >= 0; got {self.balance_alpha!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise LoramuxError(f"steps and batch_size must be positive; got {self.steps}, {self.batch_size}")


def balance_loss(collected: list[torch.Tensor]) -> torch.Tensor:
    """−Σ_i log q_i, q_i = mean weight of adapter i over every gated unit and batch row."""
    q = torch.cat(collected, dim=0).mean(0)  # (K,)
    return -torch.log(q.clamp(min=1e-9)).sum()


def train_mole(fused: "FusedModel", tasks: list["Task"], config: MoleTrainConfig = MoleTrainConfig(), *,
               progress: bool = True, log: Callable[[str], None] = print) -> MoleRouter:
    from tqdm.auto import tqdm

    from ...data import PromptFormatter
    from ...training.batching import LazyFeatures, answer_loss, collate_left, micro_batch_indices

    if not fused.adapters:
        raise LoramuxError("load the library's adapters into the fused model before training gates")
    base = fused.base
    examples = [ex for t in tasks for ex in t.examples]
    if not examples:
        raise LoramuxError("no training examples for the gates")
    fmt = PromptFormatter(base.tokenizer)
    features = LazyFeatures(fmt, examples, config.max_seq_len)
    torch.manual_seed(config.seed)
    modules = gated_modules(fused)
    gates = MoleGates(modules, len(fused.adapters), MoleConfig(config.granularity))
    device = next(base.model.parameters()).device
    gates.to(device)
    router = MoleRouter(fused, gates, list(fused.adapters))
    frozen = [p.requires_grad for p in base.model.parameters()]
    for p in base.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(gates.parameters(), lr=config.lr)
    mixture = router.layer_mixture()
    history = []
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train mole ({config.granularity})", unit="step", disable=not progress)
    try:
        for step in bar:
            idx = micro_batch_indices(len(features), config.batch_size, step, config.seed)
            inputs, labels = collate_left([features[i] for i in idx], base.tokenizer.pad_token_id)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            router.collected = []
            with fused.mixture(mixture, attention_mask=inputs["attention_mask"]):
                logits = base.model(**inputs, logits_to_keep=labels.shape[1] + 1).logits
            task = answer_loss(logits, labels.to(device))
            bal = balance_loss(router.collected)
            loss = task + config.balance_alpha * bal if config.balance_alpha else task
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "task_loss": round(task.item(), 4), "balance_loss": round(bal.item(), 4)})
            bar.set_postfix(task=f"{history[-1]['task_loss']:.3f}", balance=f"{history[-1]['balance_loss']:.3f}")
    finally:
        router.collected = None
        for p, f in zip(base.model.parameters(), frozen):
            p.requires_grad_(f)
    seconds = time.perf_counter() - started
    gates.eval()
    router.info = {"train_config": asdict(config), "seconds": round(seconds, 1), "gate_params": gates.n_params,
                   "examples": len(examples), "tasks": [t.name for t in tasks], "history": history[-20:]}
    log(f"mole: {config.steps} steps in {seconds:.0f}s; {gates.n_params:,} gate parameters; final task loss "
        f"{history[-1]['task_loss']}, balance {history[-1]['balance_loss']}")
    return router
