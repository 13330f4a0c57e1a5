"""Train many adapters at once on Ray (`loramux train --ray`): one Ray task per adapter.

Workers train and send the finished adapter's tensors back; the driver alone writes the library,
through its usual atomic commit. So no shared filesystem is needed, and a worker that dies
leaves nothing half-written: its task is retried (a bounded number of times) and, if it keeps
failing, reported. Without an address a local Ray is started (`ray.init()`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LoramuxError
from ..library.checks import PeftFiles
from ..library.spec import TrainingSummary

if TYPE_CHECKING:
    from ..data import Task
    from ..library import AdapterSpec, Library
    from .config import LoraTrainConfig


def _train_remote(model: str, device: str, dtype: str, task: "Task", config: "LoraTrainConfig", home: str,
                  on_start: Callable[[str], None] | None) -> dict:
    """Runs in a Ray worker: train one adapter, return its PEFT config, tensors and summary."""
    import torch
    from peft import get_peft_model_state_dict

    from ..models import load_base
    from .lora import train_lora

    os.environ["LORAMUX_HOME"] = home
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if on_start is not None:
        on_start(task.name)
    base = load_base(model, device=device, dtype=dtype)  # 'auto' resolves in the worker, on what Ray gave it
    result = train_lora(base, task, config, progress=False)
    name = result.model.active_adapter
    peft_config = result.model.peft_config[name].to_dict()
    peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(result.model).items()}
    return {"config": peft_config, "tensors": tensors, "summary": asdict(result.summary)}


def train_adapters_ray(model: str, tasks: list["Task"], library: "Library", config: "LoraTrainConfig", *,
                       address: str | None = None, cpus_per_task: float = 1, gpus_per_task: float = 0,
                       device: str = "cpu", dtype: str = "float32", max_retries: int = 2, skip_existing: bool = False,
                       replace: bool = False, on_start: Callable[[str], None] | None = None,
                       log: Callable[[str], None] = print) -> list["AdapterSpec"]:
    """One Ray task per task; returns the specs added. `on_start(task_name)` runs in the worker
    before training (e.g. to observe or inject faults in tests)."""
    import ray
    from tqdm.auto import tqdm

    from .._home import loramux_home
    from ..models import load_base

    todo = [t for t in tasks if not (skip_existing and t.name in library)]
    for t in tasks:
        if t not in todo:
            log(f"[loramux] {t.name}: already in the library, skipped")
    if not todo:
        return []
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus_per_task)))}})
    remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries,
                        retry_exceptions=True)(_train_remote)
    home = str(loramux_home())
    pending = {remote.remote(model, device, dtype, t, config, home, on_start): t for t in todo}
    base = load_base(model)  # the driver checks every adapter against the base before adding it
    specs, failed = [], {}
    bar = tqdm(total=len(pending), desc=f"train {len(pending)} adapters on Ray", unit="adapter")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except Exception as e:  # retries exhausted; a task's own exception rides in RayTaskError.cause
            cause = getattr(e, "cause", None) or e
            failed[task.name] = f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}"
            bar.update(1)
            continue
        files = PeftFiles(config=out["config"], tensors=out["tensors"], metadata={},
                          path=Path(f"<ray worker: {task.name}>"))
        spec = library.add(task.name, files, base=base, tasks=(task.name,), training=TrainingSummary(**out["summary"]),
                           replace=replace)
        specs.append(spec)
        bar.update(1)
        log(f"[loramux] {task.name}: {spec.training.steps} steps, loss {spec.training.final_loss}, "
            f"{spec.training.seconds:.0f}s on a Ray worker -> {library.path}")
    bar.close()
    if failed:
        raise LoramuxError(f"{len(failed)} of {len(todo)} adapters failed after {max_retries} retries: {failed}; "
                           f"the {len(specs)} that finished are in the library")
    return specs
