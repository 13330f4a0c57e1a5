"""Train the DLP router: embed each adapter's training prompts once (the encoder is frozen),
then fit the MLP head with cross-entropy, a stratified validation split and early stopping."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from .encoder import DEFAULT_ENCODER, encode_cached, load_encoder
from .head import MlpHead
from .router import DlpConfig, DlpRouter

if TYPE_CHECKING:
    from ...data import Task
    from ...library import Library
    from ...models import BaseModel


@dataclass(frozen=True)
class DlpTrainConfig:
    encoder: str = DEFAULT_ENCODER
    hidden: tuple[int, ...] = (2048, 2048)
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_epochs: int = 50
    patience: int = 5  # epochs without a better validation loss before stopping
    min_delta: float = 1e-4  # what counts as better: a validation loss lower by more than this
    val_fraction: float = 0.1
    max_per_task: int | None = None  # cap on training prompts per task (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise LoramuxError(f"val_fraction must be in (0, 1); got {self.val_fraction!r}")
        for key in ("batch_size", "max_epochs", "patience"):
            if getattr(self, key) < 1:
                raise LoramuxError(f"{key} must be a positive integer; got {getattr(self, key)!r}")
        if self.max_per_task is not None and self.max_per_task < 1:
            raise LoramuxError(f"max_per_task must be a positive integer or None; got {self.max_per_task!r}")


def labelled_prompts(library: "Library", tasks: list["Task"], *, max_per_task: int | None = None,
                     seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """(prompts, adapter index per prompt, adapter names): each adapter's own tasks, labelled with it."""
    by_name = {t.name: t for t in tasks}
    adapters = library.names()
    if not adapters:
        raise LoramuxError(f"library {str(library.path)!r} has no adapters to route between")
    owner: dict[str, str] = {}
    texts, labels = [], []
    rng = random.Random(seed)
    for k, name in enumerate(adapters):
        own = library.get(name).tasks
        if not own:
            raise LoramuxError(f"adapter {name!r} records no training task, so the router has no prompts for it; "
                               f"re-add it with its tasks (Library.add(..., tasks=[...]))")
        for task_name in own:
            if task_name in owner:
                raise LoramuxError(f"task {task_name!r} belongs to two adapters ({owner[task_name]!r} and {name!r}); "
                                   f"a router needs each task on one adapter")
            owner[task_name] = name
            if task_name not in by_name:
                raise LoramuxError(f"adapter {name!r} was trained on task {task_name!r}, which is not in the given "
                                   f"data (have {sorted(by_name)})")
            prompts = [ex.prompt for ex in by_name[task_name].examples]
            if max_per_task and len(prompts) > max_per_task:
                prompts = rng.sample(prompts, max_per_task)
            texts += prompts
            labels += [k] * len(prompts)
    return texts, labels, adapters


def _split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified: each class gives ceil(fraction * n) validation rows (none if it has one row)."""
    rng = random.Random(seed)
    train, val = [], []
    for k in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == k]
        rng.shuffle(rows)
        n_val = math.ceil(fraction * len(rows)) if len(rows) > 1 else 0
        val += rows[:n_val]
        train += rows[n_val:]
    return sorted(train), sorted(val)


def train_dlp(library: "Library", tasks: list["Task"], config: DlpTrainConfig = DlpTrainConfig(), *,
              base: "BaseModel | None" = None, selection: DlpConfig = DlpConfig(), progress: bool = True,
              log: Callable[[str], None] = print, device: str | None = None) -> DlpRouter:
    """`device`: where a separate encoder (MiniLM, an HF dir) runs; default the base's, else the CPU.
    The head is small and trains on the host beside the cached embeddings."""
    from tqdm.auto import tqdm

    texts, labels, adapters = labelled_prompts(library, tasks, max_per_task=config.max_per_task, seed=config.seed)
    encoder = load_encoder(config.encoder, base=base, device=device)
    log(f"router: {len(texts)} prompts for {len(adapters)} adapters; encoder {encoder.spec} ({encoder.dim} dims)")
    emb = encode_cached(encoder, texts, progress=progress)
    y = torch.tensor(labels)
    train_idx, val_idx = _split(labels, config.val_fraction, config.seed)

    torch.manual_seed(config.seed)
    head = MlpHead(encoder.dim, len(adapters), config.hidden, config.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    xt, yt = emb[train_idx], y[train_idx]
    xv, yv = emb[val_idx], y[val_idx]
    best = (math.inf, None, 0)  # (val loss, state, epoch)
    history = []
    bar = tqdm(range(1, config.max_epochs + 1), desc="train router", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        for s in torch.randperm(len(xt), generator=gen).split(config.batch_size):
            loss = torch.nn.functional.cross_entropy(head(xt[s]), yt[s])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            logits = head(xv if len(xv) else xt)
            target = yv if len(xv) else yt
            val_loss = float(torch.nn.functional.cross_entropy(logits, target))
            val_acc = float((logits.argmax(-1) == target).float().mean())
        history.append({"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        if val_loss < best[0] - config.min_delta:
            best = (val_loss, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
        elif epoch - best[2] >= config.patience:
            break
    bar.close()
    head.load_state_dict(best[1])
    head.eval()

    # Centroids and radii (the farthest labelled prompt of each adapter) for the distance abstain.
    centroids = torch.stack([emb[y == k].mean(0) for k in range(len(adapters))])
    unit = torch.nn.functional.normalize(centroids, dim=-1)
    dist = 1.0 - (emb * unit[y]).sum(-1)
    radii = torch.stack([dist[y == k].max() for k in range(len(adapters))])
    info = {
        "train_config": {**asdict(config), "hidden": list(config.hidden)},
        "n_train": len(train_idx), "n_val": len(val_idx), "best_epoch": best[2],
        "val_loss": best[0], "val_accuracy": history[best[2] - 1]["val_accuracy"], "head_params": head.n_params,
        "history": history,
    }
    log(f"router: best epoch {best[2]}, validation loss {best[0]:.4f}, accuracy "
        f"{info['val_accuracy']:.4f}; head {head.n_params:,} parameters")
    return DlpRouter(encoder, head, adapters, centroids, radii, selection, info)
