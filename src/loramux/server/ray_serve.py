"""`loramux serve --ray`: the same OpenAI-compatible app, one engine per Ray Serve replica.

Each replica loads the base model and every library adapter itself and serves the FastAPI app
that `loramux serve` serves (`create_app`): same request schema, routing echo and auth. Ray
Serve's proxy spreads requests over the replicas and its autoscaler, when asked, adds and removes
them. Only the library path travels to the replicas, so every node must see the library (a
shared filesystem, or the same library copied to each node).

Runtime adapter changes (POST/DELETE /v1/adapters) reach only the replica that received them,
so with more than one replica they are switched off: change the library and redeploy instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import LoramuxError
from .app import ServerConfig, create_app


class LoramuxReplica:
    """One Ray Serve replica: an engine over the library, behind `create_app`'s FastAPI app."""

    def __init__(self, model: str, library: str, config: dict, device: str = "cpu", dtype: str = "float32"):
        from ..engine import Engine
        from ..library import Library
        from ..models import load_base

        self.library = Library(library)
        self.engine = Engine(load_base(model, device=device, dtype=dtype), self.library)  # 'auto': what Ray gave it
        for name in self.library.names():
            self.engine.load(name)
        self.config = ServerConfig(**config)

    def __serve_build_asgi_app__(self):  # Ray Serve calls this after __init__, on the replica
        return create_app(self.engine, self.library, self.config)


def deployment(model: str, library: str, config: ServerConfig, *, replicas: int = 1,
               autoscaling: dict[str, Any] | None = None, ray_actor_options: dict[str, Any] | None = None,
               device: str = "cpu", dtype: str = "float32"):
    """The bound Ray Serve application: `replicas` fixed replicas, or Ray Serve's autoscaling
    config (`min_replicas`, `max_replicas`, `target_ongoing_requests`, ...) passed through."""
    from ray import serve

    if autoscaling is None and replicas < 1:
        raise LoramuxError(f"--replicas must be >= 1; got {replicas}")
    fields = dataclasses.asdict(config)
    fields.pop("routers")  # built lazily on each replica
    if (autoscaling or replicas > 1) and fields["admin_keys"]:
        raise LoramuxError("runtime adapter changes (--admin-key-file) would reach only one replica; with "
                           "--ray and more than one replica, change the library and redeploy instead")
    # Ray Serve lets a replica hold only 5 requests by default and queues the rest in its proxy:
    # the engine would batch at most 5 rows. Let the app's own batch and queue (429 when full) govern.
    options: dict[str, Any] = {"name": "loramux", "ray_actor_options": ray_actor_options or {"num_cpus": 1},
                               "max_ongoing_requests": config.max_batch + config.max_queue}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    app_cls = serve.deployment(**options)(serve.ingress()(LoramuxReplica))
    return app_cls.bind(model, library, fields, device, dtype)


def run(model: str, library: str, config: ServerConfig, *, address: str | None = None, host: str = "127.0.0.1",
        port: int = 8000, blocking: bool = True, **options):
    """Start (or join) Ray, start Ray Serve's HTTP proxy on host:port and deploy loramux there."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment(model, library, config, **options), name="loramux", route_prefix="/",
                     blocking=blocking)
