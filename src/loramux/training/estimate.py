"""How long training will take on this machine, measured before the long run starts.

One optimizer step of the real training loop (`train_lora` with `steps=1`) on the first task is
timed; every task's run is then estimated as steps × that step's time × the task's mean tokens per
example over the probed task's. A step's cost grows about linearly with its tokens at these
lengths (a forward and backward over batch × length tokens), so the estimate is rough (±30 % on
the shared 2-core machine, where the run itself varies that much) but honest: it is measured here.
"""

from __future__ import annotations

import dataclasses
from statistics import mean
from typing import TYPE_CHECKING

from .config import LoraTrainConfig
from .lora import train_lora

if TYPE_CHECKING:
    from ..data import Task
    from ..models import BaseModel


def mean_tokens(base: "BaseModel", task: "Task", sample: int = 64) -> float:
    """Mean tokens of prompt + first target over the first `sample` examples."""
    tok = base.tokenizer
    return mean(len(tok(ex.prompt + " " + ex.targets[0])["input_ids"]) for ex in task.examples[:sample])


def estimate_seconds(base: "BaseModel", tasks: list["Task"], config: LoraTrainConfig) -> dict[str, float]:
    """Estimated training seconds per task (one measured step on tasks[0], scaled by tokens)."""
    probe = dataclasses.replace(config, steps=1, warmup_steps=0, checkpoint_every=0)
    result = train_lora(base, tasks[0], probe, progress=False)
    result.model.unload()  # the plain base model again
    step = result.summary.seconds
    ref = mean_tokens(base, tasks[0])
    return {t.name: config.steps * step * mean_tokens(base, t) / ref for t in tasks}
