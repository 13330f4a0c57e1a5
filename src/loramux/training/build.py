"""Build a library: one adapter per task, each trained with `train_lora` and added atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .._home import loramux_home
from ..data import Task
from ..errors import LoramuxError
from ..library import AdapterSpec, Library
from .config import LoraTrainConfig
from .lora import train_lora

if TYPE_CHECKING:
    from ..models import BaseModel


def default_checkpoint_dir(library: Library, name: str) -> Path:
    import hashlib

    key = hashlib.sha256(str(library.path.resolve()).encode()).hexdigest()[:10]
    return loramux_home() / "runs" / key / name


def train_adapters(
    base: "BaseModel",
    tasks: list[Task | list[Task]],
    library: Library,
    config: LoraTrainConfig | list[LoraTrainConfig] | None = None,
    *,
    names: list[str] | None = None,
    skip_existing: bool = False,
    replace: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[AdapterSpec]:
    """Train one adapter per entry of `tasks`: a task, or a group of tasks trained on their union
    (MBC clusters). Adapters are named after their task unless `names` says otherwise (a group
    needs a name); `config` may give one config per entry.

    Restartable: with `skip_existing` entries whose adapter is already in the library are
    skipped, and with `resume` an interrupted one continues from its last checkpoint.
    """
    groups = [[t] if isinstance(t, Task) else list(t) for t in tasks]
    if names is None:
        if any(len(g) != 1 for g in groups):
            raise LoramuxError("a group of tasks trains one adapter and needs a name; pass names=[...]")
        names = [g[0].name for g in groups]
    configs = config if isinstance(config, list) else [config or LoraTrainConfig()] * len(groups)
    if not len(names) == len(configs) == len(groups):
        raise LoramuxError(f"{len(groups)} task groups, {len(names)} names and {len(configs)} configs: give one each")
    specs = []
    for group, name, cfg in zip(groups, names, configs):
        if skip_existing and name in library:
            log(f"[loramux] {name}: already in the library, skipped")
            specs.append(library.get(name))
            continue
        ckpt = default_checkpoint_dir(library, name)
        result = train_lora(base, group, cfg, checkpoint_dir=ckpt, resume=resume, progress=progress)
        spec = library.add(name, result.model, base=base, tasks=tuple(t.name for t in group),
                           training=result.summary, replace=replace)
        result.model.unload()  # restore the plain base model for the next adapter
        log(f"[loramux] {name}: {result.summary.steps} steps, loss {result.summary.final_loss}, "
            f"{result.summary.seconds:.0f}s -> {library.path}")
        specs.append(spec)
    return specs


def cluster_plan(clustering, config: LoraTrainConfig, *, match_steps: bool = True,
                 ) -> list[tuple[str, list[str], LoraTrainConfig]]:
    """What MBC trains (ALGORITHMS.md §4): (name, tasks, config) per cluster, named cluster<i>.
    With `match_steps` each cluster gets the sum of its members' training steps, so the cluster
    library costs what the private one did; otherwise `config.steps`. Warm-up never exceeds the steps."""
    import dataclasses

    plan = []
    for i, members in enumerate(clustering.members):
        tasks = [t for m in members for t in clustering.tasks.get(m, [m])]
        steps = sum(clustering.steps.get(m) or config.steps for m in members) if match_steps else config.steps
        plan.append((f"cluster{i}", tasks,
                     dataclasses.replace(config, steps=steps, warmup_steps=min(config.warmup_steps, steps))))
    return plan
