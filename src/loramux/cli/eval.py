from __future__ import annotations

from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE, QUANTIZE, Quantize


def eval_(
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    data_dir: Optional[str] = typer.Option(None, help="Dir of task dirs (default: the fetched BIG-bench tasks)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (default: every task of the library)."),
    strategies: str = typer.Option("base,oracle,uniform", help="base, oracle, uniform, dlp, dlp_p<P> ('_open' "
                                   "after either: no abstaining), arrow, arrow_gks, mole[:<stored gates>] "
                                   "('_abstain' after arrow, arrow_gks or mole: the library's DLP "
                                   "out-of-library test in front)."),
    limit_per_task: Optional[int] = typer.Option(None, help="A seeded sample of each task's test set."),
    seed: int = typer.Option(0, help="Sampling and shuffling seed."),
    batch_size: int = typer.Option(8, help="Examples per scoring batch."),
    cache_dir: Optional[str] = typer.Option(None, help="Keep scored predictions here; a rerun reads them back "
                                                       "(keyed by model, adapter weights and scoring code)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    quantize: Quantize = QUANTIZE,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the results as JSON here."),
    markdown: Optional[str] = typer.Option(None, "--markdown", help="Write the table as Markdown here."),
    plots: Optional[str] = typer.Option(None, "--plots", help="Write PNGs here: per-task heatmap, DLP router "
                                                              "confusion, top-p sweep (as the strategies allow)."),
    ray: bool = typer.Option(False, "--ray", help="Spread the (strategy x task) cells over Ray (local unless "
                                                  "--ray-address)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (implies --ray)."),
) -> None:
    """Score strategies side by side on the mixed test sets of the library's tasks (composite)."""
    import json

    from ..data import load_tasks
    from ..evaluation.harness import EvalConfig, evaluate, to_markdown
    from ..fusion import FusedModel
    from ..models import load_base
    from .common import default_data_dir, open_library

    config = EvalConfig(tuple(s.strip() for s in strategies.split(",") if s.strip()), limit_per_task, seed, batch_size,
                        cache_dir)
    lib = open_library(library)
    names = [t.strip() for t in tasks.split(",")] if tasks else sorted({t for s in lib.routable_specs() for t in s.tasks})
    if ray or ray_address:
        if quantize.value != "none":
            from ..errors import LoramuxError

            raise LoramuxError("--quantize is not supported with --ray yet; drop one of them")
        from ..evaluation.distributed import evaluate_ray

        result = evaluate_ray(model, str(lib.path), str(data_dir or default_data_dir()), names, config,
                              address=ray_address, device=device, dtype=dtype, log=lambda s: typer.echo(s, err=True))
    else:
        test = load_tasks(data_dir or default_data_dir(), names, "test")
        base = load_base(model, device=device, dtype=dtype, quantize=quantize.value)
        result = evaluate(FusedModel(base), lib, test, config, log=lambda s: typer.echo(s, err=True))
    table = to_markdown(result)
    typer.echo(table)
    if output:
        from pathlib import Path

        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    if markdown:
        from pathlib import Path

        Path(markdown).write_text(table)
    if plots:
        from ..evaluation.plots import plot_results

        typer.echo(f"wrote {', '.join(plot_results(result, plots))} in {plots}", err=True)
