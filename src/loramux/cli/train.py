from __future__ import annotations

from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE
from ..training.config import LoraTrainConfig

_D = LoraTrainConfig()


def train(
    task: Optional[str] = typer.Option(None, help="One task: a task dir/file, or a task name in --data-dir."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task names in --data-dir; one adapter each."),
    data_dir: Optional[str] = typer.Option(None, help="Directory of task dirs (alone: train every task in it)."),
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    name: Optional[str] = typer.Option(None, help="Adapter name (single task only; default: the task name)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    rank: int = typer.Option(_D.rank, help="LoRA rank r."),
    alpha: float = typer.Option(_D.alpha, help="LoRA alpha (scale alpha/r)."),
    dropout: float = typer.Option(_D.dropout, help="LoRA dropout."),
    target_modules: str = typer.Option("auto", help="Comma-separated module names to adapt; auto: every projection "
                                                    "of the model's blocks (q/k/v/o/gate/up/down on Llama, Qwen2, "
                                                    "Mistral, Gemma; qkv/o/gate_up/down on Phi-3)."),
    rslora: bool = typer.Option(_D.use_rslora, help="rsLoRA scaling alpha/sqrt(r)."),
    steps: int = typer.Option(_D.steps, help="Optimizer steps per adapter."),
    batch_size: int = typer.Option(_D.batch_size, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(_D.grad_accum, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(_D.lr, help="Peak learning rate."),
    warmup_steps: int = typer.Option(_D.warmup_steps, help="Linear warm-up steps."),
    weight_decay: float = typer.Option(_D.weight_decay, help="AdamW weight decay."),
    max_seq_len: int = typer.Option(_D.max_seq_len, help="Max tokens per example."),
    seed: int = typer.Option(_D.seed, help="Random seed."),
    checkpoint_every: int = typer.Option(_D.checkpoint_every, help="Checkpoint interval in steps (0 = never)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    skip_existing: bool = typer.Option(False, help="Skip tasks whose adapter is already in the library."),
    replace: bool = typer.Option(False, help="Replace adapters of the same name."),
    cluster: Optional[str] = typer.Option(None, help="clustering.json from `loramux library cluster`: one adapter "
                                                     "per cluster on the union of its tasks, steps matched."),
    method: str = typer.Option("lora", help="lora (plain) or dynamic (Dynamic LoRA: importance-driven rank "
                                            "reallocation + per-token input gates)."),
    realloc: bool = typer.Option(True, help="dynamic: reallocate rank across layers by importance."),
    input_gate: bool = typer.Option(True, help="dynamic: per-token input gate on each module's update."),
    realloc_every: int = typer.Option(10, help="dynamic: steps between reallocations."),
    ray: bool = typer.Option(False, "--ray", help="One Ray task per adapter (a local Ray unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (implies --ray)."),
    cpus_per_task: float = typer.Option(1.0, help="Ray: CPUs per adapter."),
    gpus_per_task: float = typer.Option(0.0, help="Ray: GPUs per adapter."),
    max_retries: int = typer.Option(2, help="Ray: retries of a failed adapter."),
) -> None:
    """Train one LoRA per task (or per MBC cluster) and save each into the library."""
    from ..errors import LoramuxError
    from ..models import load_base
    from ..training import train_adapters
    from .common import open_library, resolve_tasks

    config = LoraTrainConfig(
        rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(m for m in target_modules.split(",") if m),
        use_rslora=rslora, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_seq_len=max_seq_len, seed=seed,
        checkpoint_every=checkpoint_every,
    )
    if method not in ("lora", "dynamic"):
        raise LoramuxError(f"--method must be 'lora' or 'dynamic'; got {method!r}")
    if ray or ray_address:
        if cluster or method != "lora" or name:
            raise LoramuxError("--ray trains one plain LoRA per task; drop --cluster, --method and --name")
        from ..training.distributed import train_adapters_ray

        train_adapters_ray(model, resolve_tasks(task, tasks, data_dir, "train"), open_library(library, create=True),
                           config, address=ray_address, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task,
                           device=device, dtype=dtype, max_retries=max_retries, skip_existing=skip_existing, replace=replace,
                           log=typer.echo)
        return
    if method == "dynamic":
        if cluster:
            raise LoramuxError("--cluster trains plain LoRAs; drop --method dynamic")
        from ..training.dynamic import DynamicConfig

        dyn = DynamicConfig(realloc=realloc, input_gate=input_gate, realloc_every=realloc_every)
        task_list = resolve_tasks(task, tasks, data_dir, "train")
        return _train_dynamic(task_list, name, library, model, (device, dtype), config, dyn, skip_existing, replace)
    if cluster:
        return _train_clusters(cluster, data_dir, library, model, (device, dtype), config, steps_given=steps != _D.steps,
                               skip_existing=skip_existing, replace=replace, resume=resume)
    task_list = resolve_tasks(task, tasks, data_dir, "train")
    if name and len(task_list) != 1:
        raise LoramuxError(f"--name {name!r} needs exactly one task; got {len(task_list)} (adapters take task names)")
    lib = open_library(library, create=True)
    base = load_base(model, device=device, dtype=dtype)
    train_adapters(base, task_list, lib, config, names=[name] if name else None, skip_existing=skip_existing,
                   replace=replace, resume=resume, log=typer.echo)


def _train_clusters(path: str, data_dir: Optional[str], library: Optional[str], model: str, where: tuple[str, str],
                    config: LoraTrainConfig, *, steps_given: bool, skip_existing: bool, replace: bool,
                    resume: bool) -> None:
    """One adapter per cluster, named cluster<i>, on the union of its tasks. Each gets the sum of
    its members' training steps (the private library's total), unless --steps was given."""
    from ..data import load_tasks
    from ..library.clustering import Clustering
    from ..models import load_base
    from ..training import train_adapters
    from ..training.build import cluster_plan
    from .common import default_data_dir, open_library

    clustering = Clustering.load(path)
    root = data_dir or default_data_dir()
    plan = cluster_plan(clustering, config, match_steps=not steps_given)
    for name, task_names, cfg in plan:
        typer.echo(f"{name}: {', '.join(task_names)} ({cfg.steps} steps)")
    groups = [load_tasks(root, task_names, "train") for _, task_names, _ in plan]
    names, configs = [p[0] for p in plan], [p[2] for p in plan]
    lib = open_library(library, create=True)
    base = load_base(model, device=where[0], dtype=where[1])
    train_adapters(base, groups, lib, configs, names=names, skip_existing=skip_existing, replace=replace,
                   resume=resume, log=typer.echo)


def _train_dynamic(task_list, name, library, model, where, config, dyn, skip_existing: bool, replace: bool) -> None:
    """One Dynamic LoRA per task; its final ranks and importance are plotted beside its checkpoints."""
    from ..errors import LoramuxError
    from ..models import load_base
    from ..training.build import default_checkpoint_dir
    from ..training.dynamic import plot_allocation, train_dynamic
    from .common import open_library

    if name and len(task_list) != 1:
        raise LoramuxError(f"--name {name!r} needs exactly one task; got {len(task_list)} (adapters take task names)")
    lib = open_library(library, create=True)
    base = load_base(model, device=where[0], dtype=where[1])
    for t in task_list:
        adapter = name or t.name
        if skip_existing and adapter in lib:
            typer.echo(f"[loramux] {adapter}: already in the library, skipped")
            continue
        result = train_dynamic(base, t, config, dyn)
        lib.add(adapter, result.files, base=base, tasks=(t.name,), training=result.summary, replace=replace)
        plot = default_checkpoint_dir(lib, adapter).with_name(f"{adapter}-allocation.png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_allocation(result.ranks, result.importance, plot)
        typer.echo(f"[loramux] {adapter}: dynamic, {config.steps} steps, loss {result.summary.final_loss}, "
                   f"{result.summary.seconds:.0f}s -> {lib.path}; ranks {min(result.ranks.values())}.."
                   f"{max(result.ranks.values())}; allocation plot {plot}")
