"""Adapter lifecycle over HTTP (POST /v1/adapters, DELETE /v1/adapters/{name}), behind admin keys.

A swap runs on the scheduler's thread once the running batch drains, so requests in flight finish
on the version they started with. A replace is loaded into the engine first and committed to the
library only when that worked: on any failure the old version keeps serving and the library is
unchanged.
"""

import hmac
from pathlib import Path

from fastapi import Depends, Request

from ..errors import LoramuxError
from .core import ApiError, Server
from .protocol import ERRORS, AdapterLoaded, AdapterLoadRequest, AdapterUnloaded


def swap_in(server: Server, name: str, target: Path, expected_version: int | None,
            tasks: list[str] | None = None) -> dict:
    """Add or replace adapter `name` from the PEFT dir `target` (on the model's thread)."""
    from ..fusion.model import library_identity
    from ..library.checks import check_against_base, read_peft_dir

    library, engine = server.library, server.engine
    current = library.get(name).version if name in library else None
    if expected_version is not None and current != expected_version:
        raise ApiError(409, f"adapter {name!r} is at version {current}, not the expected {expected_version}",
                       "expected_version", "version_mismatch")
    try:
        files = read_peft_dir(target)
        check_against_base(files, engine.base)
    except LoramuxError as e:
        raise ApiError(400, f"path: {e}", "path") from None
    except (OSError, ValueError) as e:  # not a readable PEFT dir (the reader's own errors)
        raise ApiError(400, f"path: cannot read a PEFT adapter from {str(target)!r}: {e}", "path") from None
    spec = None

    def commit() -> str:  # the library changes only once the engine holds the new version
        nonlocal spec
        kept = library.get(name).tasks if current is not None and tasks is None else ()
        spec = library.add(name, files, base=engine.base, replace=current is not None, tasks=tasks or kept)
        return library_identity(spec)

    engine.fused.put_adapter(name, files, commit)
    server.adapters_changed(added=name if current is None else None)  # routers rebuild over the new set
    return {"name": name, "version": spec.version, "rank": spec.rank}


def add_admin_routes(app, server: Server) -> None:
    def require_admin(request: Request) -> None:
        keys = server.config.admin_keys
        if not keys:
            raise ApiError(403, "adapter lifecycle endpoints are off: start the server with admin keys", code="forbidden")
        token = request.headers.get("x-admin-key", "")
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            raise ApiError(403, "missing or invalid admin key (X-Admin-Key header)", code="forbidden")

    admin = [Depends(require_admin)]  # before the body is read: no key, no validation feedback

    @app.post("/v1/adapters", response_model=AdapterLoaded, responses=ERRORS, dependencies=admin)
    async def load_adapter(body: AdapterLoadRequest):
        root = server.config.adapter_root
        if not root:
            raise ApiError(403, "loading adapters is off: start the server with an adapter root", code="forbidden")
        if server.library is None:
            raise ApiError(400, "the server runs without a library to add adapters to")
        try:  # no `~` expansion: a client's path names no home directory on the server
            target = Path(body.path).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a NUL byte in the path
            raise ApiError(400, f"path: {e}", "path") from None
        if not target.is_relative_to(Path(root).expanduser().resolve()):
            raise ApiError(403, f"path {body.path!r} is outside the allowed adapter root", "path", "forbidden")
        return await server.on_model_thread(lambda: swap_in(server, body.name, target, body.expected_version, body.tasks),
                                            exclusive=True)

    @app.delete("/v1/adapters/{name}", response_model=AdapterUnloaded, responses=ERRORS, dependencies=admin)
    async def unload_adapter(name: str):

        def drop() -> dict:
            if name not in server.engine.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded", "name", "model_not_found")
            server.engine.unload(name)
            server.adapters_changed()
            return {"name": name, "unloaded": True}

        return await server.on_model_thread(drop, exclusive=True)
