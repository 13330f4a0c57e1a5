from __future__ import annotations

import json
from pathlib import Path

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE

app = typer.Typer(help="Benchmarks; results are JSON files to commit under benchmarks/results/.", no_args_is_help=True)
RESULTS = Path("benchmarks") / "results"


@app.command("speed")
def speed(
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    adapters: int = typer.Option(14, help="Adapters loaded (K)."),
    rank: int = typer.Option(8, help="LoRA rank of each adapter."),
    batch: int = typer.Option(8, help="Rows per batch."),
    prompt_len: int = typer.Option(96, help="Prompt tokens per row."),
    reps: int = typer.Option(7, help="Interleaved repetitions (medians are reported)."),
    memory_adapters: int = typer.Option(100, help="Adapters loaded at once for the memory figure."),
    output: str = typer.Option(str(RESULTS / "speed.json"), help="Where to write the results."),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Fused multi-LoRA forward and decode vs PEFT, side by side in one run."""
    from ..bench.speed import run

    result = run(model=model, adapters=adapters, rank=rank, batch=batch, prompt_len=prompt_len, reps=reps,
                 memory_adapters=memory_adapters, device=device, dtype=dtype)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps({"ratios": result["ratios"], "memory": result["memory"]}, indent=2))
