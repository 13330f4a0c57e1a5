"""Choosing the MoLE gates' inference sharpening (router.py's `sharpen`) on held-out examples.

The gates' answer loss is measured on the validation examples `train_mole` held out (the same
`val_per_task` examples of each task, by the same seed), once per factor of a grid; the factor
with the lowest loss is stored with the gates. No test example is read. Beyond the paper
(arXiv 2404.13628), whose gates keep the temperature they were trained with.

Gates trained from a routing start (route_init.py) that kept a later step carry the start too
(`MoleRouter.start`, in memory, straight after `train_mole`). Training kept the later step by
its unsharpened loss, but the gates are served sharpened, and a start fitted to route gains more
from sharpening: both are scored over the grid, and the pair (gates, factor) with the lowest
loss is kept; a tie keeps the trained gates.
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
    lowest validation answer loss; 1.0 stays unless another factor is strictly lower. With a
    routing start in hand (`router.start`), the start and the kept gates are both scored and the
    better pair kept (module docstring). `tasks`: the training tasks the gates were trained on.
    Returns {factor: validation answer loss} of the gates kept."""
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
    factors = sorted({1.0, *map(float, grid)})
    kept = router.info.get("best_step")
    start = router.start if kept != 0 else None  # kept at step 0, the gates in hand are the start
    trained = None  # the kept gates, restored after the start was scored (None: nothing else is scored)
    if start is not None:
        trained = {k: v.detach().clone() for k, v in router.gates.state_dict().items()}
    candidates = {kept: trained, **({0: start} if start is not None else {})}
    curves: dict = {}
    before = router.sharpen
    try:
        for step, state in candidates.items():
            if state is not None:
                router.gates.load_state_dict(state)
            curves[step] = {}
            for factor in factors:
                router.sharpen = factor
                with torch.no_grad():
                    loss, _ = _validation_loss(router, fused, router.layer_mixture(), features, [-1] * len(val),
                                               config["batch_size"], device)
                curves[step][factor] = round(loss, 4)
                log(f"mole sharpen {factor:g}{' (routing start)' if step != kept else ''}: "
                    f"validation answer loss {loss:.4f}")
    except BaseException:
        router.sharpen = before  # a failed calibration leaves the gates as they were
        if trained is not None:
            router.gates.load_state_dict(trained)
        raise
    # the lowest loss; on a tie the trained gates, then factor 1
    step, factor = min(((s, f) for s in curves for f in curves[s]),
                       key=lambda sf: (curves[sf[0]][sf[1]], sf[0] != kept, sf[1] != 1.0))
    if candidates[step] is not None:
        router.gates.load_state_dict(candidates[step])
    router.sharpen = factor
    if step != kept:  # the start wins once sharpened
        router.info.update(best_step=step, best_val_task_loss=curves[step][1.0], kept_by="sharpened validation")
    router.info.update(sharpen_curve={str(f): v for f, v in curves[step].items()}, sharpen_examples=len(val))
    if len(curves) > 1:
        router.info["sharpen_curves_by_step"] = {str(s): {str(f): v for f, v in c.items()} for s, c in curves.items()}
        other = min(curves[kept if step != kept else 0].values())
        log(f"mole: kept the {'routing start' if step != kept else f'gates of step {kept}'} at x {factor:g} "
            f"(validation answer loss {curves[step][factor]:.4f}; the other gates' best {other:.4f})")
    else:  # a later calibration of stored gates: one candidate, the earlier comparison's grid is gone
        router.info.pop("sharpen_curves_by_step", None)
    router.start = None
    return curves[step]
