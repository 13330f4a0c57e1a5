from __future__ import annotations

from typing import Optional

import typer

from ..models import DEFAULT_MODEL


def export(
    dest: str = typer.Argument(..., help="New directory to write to."),
    mix: Optional[str] = typer.Option(None, help="The fixed mixture: name=weight,name=weight,..."),
    router: Optional[str] = typer.Option(None, help="(refused for arrow/mole: their weights change per token/layer)"),
    merge: bool = typer.Option(False, help="Write a full HF model with the mixture folded into its weights."),
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    name: str = typer.Option("mix", help="Adapter name in the printed serve commands."),
) -> None:
    """Export a fixed mixture exactly: one standard PEFT LoRA (rank-concatenated) or a merged model."""
    from ..errors import LoramuxError
    from ..library.export import export_mixture, merge_mixture, mixture_factors, serve_commands
    from ..models import load_base
    from .common import open_library
    from .generate import parse_mix

    if router:
        raise LoramuxError(f"cannot export --router {router}: a router chooses weights per prompt, token or layer, "
                           f"and an exported adapter holds one fixed mixture; give --mix name=weight,...")
    if not mix:
        raise LoramuxError("give the mixture to export: --mix name=weight,... (e.g. --mix hyperbaton=0.7,navigate=0.3)")
    mixture = parse_mix(mix)
    lib = open_library(library)
    base = load_base(model)
    if merge:
        typer.echo(f"merged model written to {merge_mixture(lib, mixture, dest, base)}")
        return
    path = export_mixture(lib, mixture, dest, base)
    _, rank, _ = mixture_factors(lib, mixture)
    typer.echo(f"PEFT LoRA of rank {rank} written to {path}")
    for engine, cmd in serve_commands(str(base.path), path, rank, name).items():
        typer.echo(f"{engine}: {cmd}")
