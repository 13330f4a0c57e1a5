"""How long training will take on this machine, measured before the long run starts.

One optimizer step of the real training loop (`train_lora` with `steps=1`) is timed on each task,
and the task's run is estimated as steps × that step. A step is not proportional to its tokens
(scaling one probe by tokens per example overestimated a task with 4x longer prompts by 3x on the
2-core CPU), so each task gets its own probe; a first step also pays one-time warm-up, so the
estimate errs high (~25 % on that machine).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .config import LoraTrainConfig
from .lora import train_lora

if TYPE_CHECKING:
    from ..data import Task
    from ..models import BaseModel


def estimate_seconds(base: "BaseModel", tasks: list["Task"], config: LoraTrainConfig) -> dict[str, float]:
    """Estimated training seconds per task: `config.steps` times one measured step on it."""
    probe = dataclasses.replace(config, steps=1, warmup_steps=0, checkpoint_every=0)
    out = {}
    for task in tasks:
        result = train_lora(base, task, probe, progress=False)
        result.model.unload()  # the plain base model again
        out[task.name] = config.steps * result.summary.seconds
    return out
