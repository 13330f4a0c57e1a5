from __future__ import annotations

from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import COMPILE, DEVICE, DTYPE, QUANTIZE, Quantize

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port."),
    api_key_file: Optional[str] = typer.Option(None, help="File with one API key per line (or $LORAMUX_API_KEYS, "
                                                          "comma-separated)."),
    admin_key_file: Optional[str] = typer.Option(None, help="File with admin keys (X-Admin-Key) for POST/DELETE "
                                                            "/v1/adapters; without it those endpoints are off."),
    adapter_root: Optional[str] = typer.Option(None, help="Directory below which POST /v1/adapters may load PEFT dirs."),
    insecure: bool = typer.Option(False, help="Allow binding a non-loopback address without API keys."),
    max_batch: int = typer.Option(16, help="Rows in the running batch."),
    max_queue: int = typer.Option(64, help="Waiting requests before 429."),
    max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    prefix_cache_tokens: int = typer.Option(4096, min=0, help="Keep the keys and values of this many recent prompt "
                                                              "tokens; a prompt that starts like a recent one (the "
                                                              "chat template, a shared instruction) prefills only "
                                                              "the rest. 0: off."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    pack: bool = typer.Option(True, "--pack/--no-pack", help="CPU fp32: serve from oneDNN-prepacked base weights "
                                                             "(faster batched decode, one more copy of the weights)."),
    compile: bool = COMPILE,
    quantize: Quantize = QUANTIZE,
    ray: bool = typer.Option(False, "--ray", help="Serve as a Ray Serve deployment (a local Ray unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (implies --ray)."),
    replicas: int = typer.Option(1, help="--ray: number of replicas, each with its own engine."),
    autoscaling: Optional[str] = typer.Option(None, help="--ray: Ray Serve autoscaling config as JSON, e.g. "
                                                         "'{\"min_replicas\": 1, \"max_replicas\": 4}' (overrides --replicas)."),
    cpus_per_replica: float = typer.Option(1.0, help="--ray: CPUs Ray reserves for each replica."),
    gpus_per_replica: float = typer.Option(0.0, help="--ray: GPUs Ray reserves for each replica."),
) -> None:
    """Serve the base model, every library adapter and the routers over an OpenAI-compatible API."""
    import os
    from pathlib import Path

    from ..cpu_threads import on_passing_thread
    from ..engine import Engine
    from ..errors import LoramuxError
    from ..models import load_base
    from ..server import ServerConfig, create_app
    from .common import open_library

    def read_keys(path: str | None, flag: str) -> set[str]:
        if not path:
            return set()
        try:
            return {ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()}
        except OSError as e:
            raise LoramuxError(f"cannot read {flag} {path!r}: {e}") from None

    keys = read_keys(api_key_file, "--api-key-file")
    admin = read_keys(admin_key_file, "--admin-key-file")
    keys |= {k.strip() for k in os.environ.get("LORAMUX_API_KEYS", "").split(",") if k.strip()}
    if not keys and host not in LOOPBACK and not insecure:
        raise LoramuxError(f"refusing to bind {host!r} without API keys; give --api-key-file (or LORAMUX_API_KEYS), "
                           f"bind 127.0.0.1, or pass --insecure")
    if not keys:
        typer.echo(f"no API keys: anyone who can reach {host}:{port} can use this server", err=True)
    lib = open_library(library, create=True)  # no flags: the default library, made empty if new
    config = ServerConfig(api_keys=frozenset(keys), admin_keys=frozenset(admin), adapter_root=adapter_root,
                          max_batch=max_batch, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                          pack_linears=pack, prefix_cache_tokens=prefix_cache_tokens)
    if ray or ray_address:
        import json

        if compile or quantize.value != "none":
            raise LoramuxError(f"{'--compile' if compile else '--quantize'} is not supported with --ray yet; drop one of them")

        from ..server import ray_serve

        try:
            scaling = json.loads(autoscaling) if autoscaling else None
        except json.JSONDecodeError as e:
            raise LoramuxError(f"--autoscaling {autoscaling!r} is not JSON: {e}") from None
        actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
        typer.echo(f"Ray Serve: {'autoscaling ' + json.dumps(scaling) if scaling else f'{replicas} replica(s)'} "
                   f"on http://{host}:{port}")
        ray_serve.run(model, str(lib.path), config, address=ray_address, host=host, port=port, replicas=replicas,
                      autoscaling=scaling, ray_actor_options=actor, device=device, dtype=dtype)
        return
    def build():
        engine = Engine(load_base(model, device=device, dtype=dtype, quantize=quantize.value), lib, compile=compile)
        for name in lib.names():
            engine.load(name)
        return create_app(engine, lib, config)

    # the weights are loaded and packed on a thread that ends, so that the scheduler's OpenMP team
    # is the process's only one (cpu_threads.py: a second team halves the decode speed)
    app = on_passing_thread(build)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
