from __future__ import annotations

import json
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .common import open_library

app = typer.Typer(help="The adapter library: PEFT-format adapters plus a manifest.", no_args_is_help=True)
LIBRARY = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library).")


@app.command("init")
def init(path: str = typer.Argument(..., help="Directory to create the library in (new or empty).")) -> None:
    """Create an empty library."""
    lib = open_library(path, create=True)
    typer.echo(f"library ready at {lib.path}")


@app.command("list")
def list_(library: Optional[str] = LIBRARY) -> None:
    """One line per adapter: name, tasks, rank, alpha, version, base."""
    lib = open_library(library)
    specs = lib.list()
    if not specs:
        typer.echo(f"{lib.path}: empty")
    general = lib.general
    for s in sorted(specs, key=lambda s: s.name):
        steps = f"{s.training.steps} steps" if s.training else "imported"
        typer.echo(f"{s.name:32s} tasks={','.join(s.tasks) or '-':28s} r={s.rank:<3d} alpha={s.alpha:<5g} "
                   f"v{s.version} {steps} base={s.base_model} ({s.base_fingerprint})"
                   + ("  [general: serves abstained prompts]" if s.name == general else ""))


@app.command("general")
def general(
    name: Optional[str] = typer.Argument(None, help="The adapter that serves prompts routers abstain on."),
    unset: bool = typer.Option(False, "--unset", help="Name none: abstained prompts go to the base model."),
    library: Optional[str] = LIBRARY,
) -> None:
    """Show, set or unset the library's general adapter. Routers never route to it; it serves the
    prompts they abstain on (e.g. a multi-task LoRA) instead of the base model alone."""
    from ..errors import LoramuxError

    lib = open_library(library)
    if name is not None and unset:
        raise LoramuxError("give an adapter name or --unset, not both")
    if name is None and not unset:
        typer.echo(lib.general or "none: abstained prompts go to the base model")
        return
    usable = set(lib.usable_routers())
    lib.set_general(None if unset else name)
    typer.echo(f"general adapter: {name}" if name else "general adapter unset: abstained prompts go to the base model")
    others = [spec.rank for spec in lib.routable_specs()]
    if name and others and lib.get(name).rank > max(others):  # docs/routing.md: a general adapter's cost
        typer.echo(f"warning: {name!r} has rank {lib.get(name).rank}, the routed adapters at most {max(others)}; the "
                   f"prompts it serves cost a forward of its rank, and a server batch that mixes them with routed "
                   f"prompts pads those rows to its width (docs/routing.md)", err=True)
    for router in sorted(usable - set(lib.usable_routers())):  # e.g. trained to route to it, or trained while it was general
        typer.echo(f"warning: stored router {router!r} is refused now ({lib.routers()[router]['kind']}); retrain it "
                   f"with `loramux router train --library {lib.path}`", err=True)


@app.command("show")
def show(name: str = typer.Argument(..., help="Adapter name."), library: Optional[str] = LIBRARY) -> None:
    """Print an adapter's full manifest entry as JSON."""
    lib = open_library(library)
    typer.echo(json.dumps({**lib.get(name).to_dict(), "path": str(lib.adapter_dir(name))}, indent=2))


@app.command("add")
def add(
    source: str = typer.Argument(..., help="A PEFT LoRA dir (adapter_config.json + adapter_model.safetensors)."),
    name: str = typer.Option(..., help="Name in the library."),
    tasks: str = typer.Option("", help="Comma-separated task names the adapter serves."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model to check the adapter against."),
    replace: bool = typer.Option(False, help="Replace an adapter of the same name (its version goes up)."),
    library: Optional[str] = LIBRARY,
) -> None:
    """Add an existing PEFT adapter after checking it fits the base model."""
    from ..models import load_base

    lib = open_library(library, create=True)
    spec = lib.add(name, source, base=load_base(model), tasks=[t for t in tasks.split(",") if t], replace=replace)
    typer.echo(f"added {spec.name} v{spec.version} (r={spec.rank}, modules {','.join(spec.target_modules)})")


@app.command("remove")
def remove(name: str = typer.Argument(..., help="Adapter name."), library: Optional[str] = LIBRARY) -> None:
    """Remove an adapter (atomically)."""
    open_library(library).remove(name)
    typer.echo(f"removed {name}")


@app.command("verify")
def verify(
    model: Optional[str] = typer.Option(None, help="Also check every adapter against this base model."),
    library: Optional[str] = LIBRARY,
) -> None:
    """Check files, sha256 and safetensors of every adapter (and fit to --model). Exit 1 on problems."""
    from ..models import load_base

    lib = open_library(library)
    problems = lib.verify(load_base(model) if model else None)
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    typer.echo(f"{len(lib)} adapter(s), {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@app.command("export")
def export(
    name: str = typer.Argument(..., help="Adapter name."),
    dest: str = typer.Argument(..., help="New directory to write the PEFT adapter to."),
    library: Optional[str] = LIBRARY,
) -> None:
    """Copy an adapter out as a plain PEFT dir."""
    typer.echo(str(open_library(library).export(name, dest)))


@app.command("cluster")
def cluster(
    k: int = typer.Option(..., "--k", help="Number of clusters."),
    library: Optional[str] = LIBRARY,
    sparsity: float = typer.Option(0.5, help="Fraction of each flattened adapter zeroed (smallest magnitudes)."),
    svd_dims: int = typer.Option(64, help="Truncated SVD dimensions (capped at adapters - 1)."),
    n_init: int = typer.Option(10, help="k-means restarts (k-means++ init)."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Optional[str] = typer.Option(None, help="Output dir for clustering.json + similarity.png (default: mbc-k<K>)."),
) -> None:
    """MBC: group the library's adapters by parameter similarity (then `loramux train --cluster`)."""
    from ..library.clustering import ClusterConfig, cluster_adapters, save_clustering

    lib = open_library(library)
    clustering = cluster_adapters(lib, ClusterConfig(k=k, sparsity=sparsity, svd_dims=svd_dims, n_init=n_init, seed=seed))
    json_path, png_path = save_clustering(clustering, out or f"mbc-k{k}")
    for i, group in enumerate(clustering.members):
        typer.echo(f"cluster {i}: {', '.join(group)}")
    typer.echo(f"wrote {json_path} and {png_path}")
