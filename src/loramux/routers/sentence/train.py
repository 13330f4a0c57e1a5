"""Train the DLP router: embed each adapter's training prompts once (the encoder is frozen),
then fit the MLP head with cross-entropy, a stratified validation split and early stopping.

Beyond the paper (docs/routing.md):
- every example is embedded in several formats (formats.py), so the head learns the content
  rather than each task's template;
- out-of-library thresholds on the head's energy score, -logsumexp(logits) (Liu et al. 2020,
  arXiv 2010.03759), one per adapter, are set on the validation prompts alone at `abstain_recall`
  of each adapter's prompts kept, and stored with the router: a prompt scoring above the
  threshold of the adapter it would go to is sent to the base model;
- `previous` warm-starts the head from an older router of the same encoder (a grown library):
  only the new prompts are encoded, and the kept adapters' output rows start where they were.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from .encoder import DEFAULT_ENCODER, encode_cached, load_encoder
from .formats import TRAIN_FORMATS, check_formats, render
from .head import MlpHead
from .router import Abstain, DlpConfig, DlpRouter, energy

if TYPE_CHECKING:
    from ...data import Example, Task
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
    warm_patience: int = 1  # the same for a warm-started head, which starts near its optimum
    min_delta: float = 1e-4  # what counts as better: a validation loss lower by more than this
    val_fraction: float = 0.1
    max_per_task: int | None = 200  # cap on training examples per task (None: all)
    formats: tuple[str, ...] = tuple(TRAIN_FORMATS)  # each example is embedded in every one of these
    abstain_recall: float | None = 0.95  # share of in-library validation prompts kept; None: never abstain
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise LoramuxError(f"val_fraction must be in (0, 1); got {self.val_fraction!r}")
        for key in ("batch_size", "max_epochs", "patience", "warm_patience"):
            if getattr(self, key) < 1:
                raise LoramuxError(f"{key} must be a positive integer; got {getattr(self, key)!r}")
        if self.max_per_task is not None and self.max_per_task < 1:
            raise LoramuxError(f"max_per_task must be a positive integer or None; got {self.max_per_task!r}")
        check_formats(tuple(self.formats))
        if self.abstain_recall is not None and not 0 < self.abstain_recall <= 1:
            raise LoramuxError(f"abstain_recall must be in (0, 1] or None; got {self.abstain_recall!r}")


def labelled_prompts(library: "Library", tasks: list["Task"], *, max_per_task: int | None = None,
                     seed: int = 0) -> tuple[list["Example"], list[int], list[str]]:
    """(examples, adapter index per example, adapter names): each adapter's own tasks, labelled with it."""
    by_name = {t.name: t for t in tasks}
    adapters = library.routable()  # never the general adapter: it serves what the router abstains on
    if not adapters:
        raise LoramuxError(f"library {str(library.path)!r} has no adapters to route between")
    owner: dict[str, str] = {}
    texts, labels = [], []
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
            prompts = list(by_name[task_name].examples)
            if max_per_task and len(prompts) > max_per_task:
                # seeded per task: a grown library samples its old tasks' prompts as before (cached embeddings)
                prompts = random.Random(f"{seed}/{task_name}").sample(prompts, max_per_task)
            texts += prompts
            labels += [k] * len(prompts)
    return texts, labels, adapters


def _split(labels: list[int], fraction: float, seed: int, names: list[str]) -> tuple[list[int], list[int]]:
    """Stratified: each class gives ceil(fraction * n) validation rows (none if it has one row),
    shuffled by a seed of its own adapter's name: adding an adapter leaves the others' splits as
    they were, so a warm-started head never validates on rows its predecessor trained on."""
    train, val = [], []
    for k in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == k]
        random.Random(f"{seed}/{names[k]}").shuffle(rows)
        n_val = math.ceil(fraction * len(rows)) if len(rows) > 1 else 0
        val += rows[:n_val]
        train += rows[n_val:]
    return sorted(train), sorted(val)


def _expand(rows: list[int], n_formats: int) -> list[int]:
    """Example rows -> rows of the (example, format) matrix: an example's formats stay on one side
    of the validation split, so validation never sees another format of a training example."""
    return [r * n_formats + f for r in rows for f in range(n_formats)]


def _warm_start(head: MlpHead, previous: DlpRouter | None, adapters: list[str]) -> bool:
    """Start from `previous`'s head where it fits: same encoder and hidden sizes. Its output rows
    follow their adapters (kept ones keep what they learned; a new adapter's row starts fresh)."""
    if previous is None or previous.head.hidden != head.hidden or previous.head.dim != head.dim:
        return False
    old = previous.head.state_dict()
    new = head.state_dict()
    last = f"net.{len(head.net) - 1}"  # the output layer
    for k, v in old.items():
        if not k.startswith(last + "."):
            new[k] = v.clone()
    for j, name in enumerate(adapters):
        if name in previous.adapters:
            i = previous.adapters.index(name)
            new[last + ".weight"][j] = old[last + ".weight"][i]
            new[last + ".bias"][j] = old[last + ".bias"][i]
    head.load_state_dict(new)
    return True


def train_dlp(library: "Library", tasks: list["Task"], config: DlpTrainConfig = DlpTrainConfig(), *,
              base: "BaseModel | None" = None, selection: DlpConfig = DlpConfig(), progress: bool = True,
              log: Callable[[str], None] = print, device: str | None = None,
              previous: DlpRouter | None = None) -> DlpRouter:
    """`device`: where a separate encoder (MiniLM, an HF dir) runs; default the base's, else the CPU.
    The head is small and trains on the host beside the cached embeddings. `previous`: a router
    of the same encoder to warm-start from (its encoder object is reused too)."""
    from tqdm.auto import tqdm

    examples, labels, adapters = labelled_prompts(library, tasks, max_per_task=config.max_per_task, seed=config.seed)
    if previous is not None and previous.encoder.spec == config.encoder:
        encoder = previous.encoder
    else:
        encoder, previous = load_encoder(config.encoder, base=base, device=device), None
    formats = tuple(config.formats)
    log(f"router: {len(examples)} prompts x {len(formats)} formats for {len(adapters)} adapters; encoder "
        f"{encoder.spec} ({encoder.dim} dims)")
    emb = encode_cached(encoder, [render(ex, f) for ex in examples for f in formats], progress=progress)
    y = torch.tensor(labels).repeat_interleave(len(formats))
    train_ex, val_ex = _split(labels, config.val_fraction, config.seed, adapters)
    train_idx, val_idx = _expand(train_ex, len(formats)), _expand(val_ex, len(formats))

    torch.manual_seed(config.seed)
    head = MlpHead(encoder.dim, len(adapters), config.hidden, config.dropout)
    warm = _warm_start(head, previous, adapters)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    xt, yt = emb[train_idx], y[train_idx]
    xv, yv = emb[val_idx], y[val_idx]
    best = (math.inf, None, 0)  # (val loss, state, epoch)
    history = []
    patience = config.warm_patience if warm else config.patience
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
        elif epoch - best[2] >= patience:
            break
    bar.close()
    head.load_state_dict(best[1])
    head.eval()

    # Centroids and radii (the farthest labelled prompt of each adapter) for the distance abstain.
    centroids = torch.stack([emb[y == k].mean(0) for k in range(len(adapters))])
    unit = torch.nn.functional.normalize(centroids, dim=-1)
    dist = 1.0 - (emb * unit[y]).sum(-1)
    radii = torch.stack([dist[y == k].max() for k in range(len(adapters))])
    abstain = None
    if config.abstain_recall is not None and not len(xv):
        log("router: no validation prompts (every task has one example), so no out-of-library threshold is stored")
    elif config.abstain_recall is not None:
        # On held-out prompts only (the training prompts' scores are optimistically low), grouped by
        # the adapter the head ranks first: the threshold a prompt meets is that adapter's.
        with torch.no_grad():
            logits = head(xv)
        scores, first = energy(logits), logits.argmax(-1)
        q = config.abstain_recall
        abstain = Abstain("energy", float(torch.quantile(scores, q)), q, len(scores),
                          {a: float(torch.quantile(scores[first == k], q)) for k, a in enumerate(adapters)
                           if bool((first == k).any())})
    info = {
        "train_config": {**asdict(config), "hidden": list(config.hidden), "formats": list(formats)},
        "n_train": len(train_idx), "n_val": len(val_idx), "best_epoch": best[2], "warm_start": warm,
        "val_loss": best[0], "val_accuracy": history[best[2] - 1]["val_accuracy"], "head_params": head.n_params,
        "history": history,
    }
    log(f"router: best epoch {best[2]}, validation loss {best[0]:.4f}, accuracy "
        f"{info['val_accuracy']:.4f}; head {head.n_params:,} parameters"
        + (f"; abstains above each adapter's energy threshold ({abstain.recall:.0%} of its validation prompts kept)"
           if abstain else ""))
    router = DlpRouter(encoder, head, adapters, centroids, radii, selection, info, abstain)
    router.general = library.general or ""  # what it abstains to, as a loaded one does
    return router
