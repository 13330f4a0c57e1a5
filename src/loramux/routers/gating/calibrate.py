"""Choosing the MoLE gates' inference sharpening (router.py's `sharpen`) on held-out examples.

The gates' answer loss is measured on the validation examples `train_mole` held out (the same
`val_per_task` examples of each task, by the same seed), once per factor of a grid; the factor
with the lowest loss is stored with the gates. No test example is read. Beyond the paper
(arXiv 2404.13628), whose gates keep the temperature they were trained with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from .train import _split_labelled, _validation_loss

if TYPE_CHECKING:
    from ...data import Task
    from .router import MoleRouter

GRID = (1.0, 1.5, 2.0, 3.0, 4.0)


def calibrate_sharpen(router: "MoleRouter", tasks: list["Task"], grid: tuple[float, ...] = GRID, *,
                      log: Callable[[str], None] = print) -> dict[float, float]:
    """Set `router.sharpen` (and its info, saved with the gates) to the factor of `grid` with the
    lowest validation answer loss; 1.0 stays unless another factor is strictly lower. `tasks`: the
    training tasks the gates were trained on. Returns {factor: validation answer loss}."""
    from ...data import PromptFormatter
    from ...training.batching import LazyFeatures

    config = router.info.get("train_config") or {}
    if not config.get("val_per_task"):
        raise LoramuxError("these gates were trained without held-out validation examples; nothing to choose on")
    if not grid or any(not g > 0 for g in grid):
        raise LoramuxError(f"the sharpening grid must hold factors > 0; got {list(grid)!r}")
    trained_on = router.info.get("tasks")
    if trained_on is not None and sorted(t.name for t in tasks) != sorted(trained_on):
        raise LoramuxError(f"calibrate on the tasks the gates were trained on, {sorted(trained_on)}: their held-out "
                           f"examples are the validation set; got {sorted(t.name for t in tasks)}")
    _, val = _split_labelled(tasks, config["val_per_task"], config["seed"])
    if router.info.get("val_examples") not in (None, len(val)):
        raise LoramuxError(f"these tasks hold out {len(val)} validation examples; the gates were trained holding "
                           f"out {router.info['val_examples']} (other task files?)")
    fused = router.fused
    features = LazyFeatures(PromptFormatter(fused.base.tokenizer), [e for e, _ in val], config["max_seq_len"])
    device = next(fused.base.model.parameters()).device
    losses: dict[float, float] = {}
    before = router.sharpen
    try:
        for factor in sorted({1.0, *map(float, grid)}):
            router.sharpen = factor
            with torch.no_grad():
                loss, _ = _validation_loss(router, fused, router.layer_mixture(), features, [-1] * len(val),
                                           config["batch_size"], device)
            losses[factor] = round(loss, 4)
            log(f"mole sharpen {factor:g}: validation answer loss {loss:.4f}")
    except BaseException:
        router.sharpen = before  # a failed calibration leaves the gates as they were
        raise
    router.sharpen = min(losses, key=lambda f: (losses[f], f != 1.0))
    router.info.update(sharpen_curve={str(f): v for f, v in losses.items()}, sharpen_examples=len(val))
    return losses
