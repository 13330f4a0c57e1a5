from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE


def score(
    task: Optional[str] = typer.Option(None, help="A task dir/file, or a task name in --data-dir."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task names in --data-dir."),
    data_dir: Optional[str] = typer.Option(None, help="Directory of task dirs (alone: every task in it)."),
    adapter: Optional[str] = typer.Option(None, help="Library adapter to apply (default: the base model alone)."),
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    split: str = typer.Option("test", help="train or test."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N examples."),
    batch_size: int = typer.Option(8, help="Examples per forward batch."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write results (with predictions) as JSON."),
) -> None:
    """Score the base model, or one adapter, on tasks: choice log-likelihood grade or exact match."""
    from ..evaluation import score_task
    from ..models import load_base
    from .common import open_library, resolve_tasks

    task_list = resolve_tasks(task, tasks, data_dir, split)
    base = load_base(model, device=device, dtype=dtype)
    net = open_library(library).load_peft(base, adapter) if adapter else base.model
    results = []
    for t in task_list:
        r = score_task(net, base.tokenizer, t, batch_size=batch_size, limit=limit)
        results.append(r)
        typer.echo(f"{t.name:48s} {r.metric:22s} {r.score:.4f}  (n={r.n}, {r.seconds:.0f}s, "
                   f"{'adapter ' + adapter if adapter else 'base'})")
    if output:
        Path(output).write_text(json.dumps([r.to_dict(with_predictions=True) for r in results], indent=2))
