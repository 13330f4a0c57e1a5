"""`loramux serve`: an OpenAI-compatible HTTP server over the engine. This file only assembles it:

- `protocol.py`: every request and response body (validation and the OpenAPI document);
- `core.py`: what the routes share (`Server`: engine, scheduler, routers, planning, errors);
- `openai_routes.py`: completions, chat, models, llama.cpp's /lora-adapters;
- `admin.py`: the adapter lifecycle; `web.py`: the page and its JSON; `auth.py`: keys, body limits.

Requests run through one continuous-batching scheduler, so requests with different mixtures share
forwards, and an error in one request ends that request alone (see `engine/scheduler.py`).
"""

import logging
import threading
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from ..errors import LoramuxError
from .admin import add_admin_routes
from .auth import Guard
from .core import ApiError, Server, ServerConfig
from .openai_routes import add_openai_routes
from .web import add_web_routes

__all__ = ["ServerConfig", "create_app", "ApiError"]

log = logging.getLogger("loramux.server")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-int"}


def _field_path(loc) -> str:
    """('body', 'prompt', 'list[str]', 0) -> 'prompt.0': the body's field path, without pydantic's
    union branch tags."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts)


def _validation_error(e: RequestValidationError) -> ApiError:
    seen: dict[str, list[str]] = {}
    for err in e.errors():
        if err.get("type") == "json_invalid" or err["loc"][:1] == ("body",) and len(err["loc"]) == 1 and \
                err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            what = "is not valid JSON" if err.get("type") == "json_invalid" else "must be a JSON object"
            return ApiError(400, f"the request body {what}")
        path = _field_path(err["loc"]) or "body"
        msg = "required" if err.get("type") == "missing" else err["msg"].removeprefix("Value error, ")
        if msg not in seen.setdefault(path, []):
            seen[path].append(msg)
    text = "; ".join(f"{path}: {' or '.join(msgs[:4])}" for path, msgs in list(seen.items())[:6])
    return ApiError(400, text, next(iter(seen), None))


def create_app(engine, library=None, config: ServerConfig | None = None) -> FastAPI:
    from contextlib import asynccontextmanager

    server = Server(engine, library, config or ServerConfig())

    def warm_up() -> None:
        """Compile every batch shape before the scheduler takes requests. It runs beside the
        event loop, on a daemon thread: the server answers /health and /ready (503, warming) at
        once, generation gets a 503 with Retry-After until it is done, and a SIGTERM or Ctrl-C
        during a first compile (minutes) ends the process instead of waiting for the compile."""
        try:
            log.info("compiling the decode step for 1..%d rows (minutes on a first run; later runs load "
                     "Inductor's cache)", server.config.max_batch)
            log.info("decode step compiled: %s", engine.compiled.warmup(server.config.max_batch))
        except Exception:  # serve eagerly rather than not at all; the log says why
            log.exception("compiling the decode step failed; serving with the eager decode step")
            engine.compiled = None
        finally:
            with server.lifecycle:
                if not server.stopping.is_set():
                    server.scheduler.start()
                server.warming.clear()

    @asynccontextmanager
    async def lifespan(app):
        server.stopping.clear()
        if engine.compiled is not None:
            server.warming.set()
            threading.Thread(target=warm_up, name="loramux-warmup", daemon=True).start()
        else:
            server.scheduler.start()
        try:
            yield
        finally:
            with server.lifecycle:
                server.stopping.set()
            server.scheduler.stop()

    app = FastAPI(title="loramux", lifespan=lifespan,
                  description="OpenAI-compatible serving of a library of LoRA adapters, routed and mixed per request.")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        route = request.scope.get("route")  # the route's template, so clients cannot mint new series
        server.metrics.requests.labels(getattr(route, "path", "unmatched"), str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, _validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # the framework's own: unknown paths, unparsable bodies
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON in UTF-8"
        return await api_error(request, ApiError(e.status_code, message, headers=dict(e.headers or {})))

    @app.exception_handler(LoramuxError)
    async def bad_input(request: Request, e: LoramuxError):
        return await api_error(request, ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a 5xx is a bug: say so, log it under an id
        rid = f"err-{uuid.uuid4().hex[:12]}"
        log.error("request %s to %s failed", rid, request.url.path, exc_info=e)
        return await api_error(request, ApiError(500, f"internal error (request id {rid}); the server logged it",
                                                 code="internal_error"))

    add_openai_routes(app, server)
    add_admin_routes(app, server)
    add_web_routes(app, server)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        alive = server.scheduler.alive and not server.warming.is_set()
        return JSONResponse({"ready": alive, "warming": server.warming.is_set(), "adapters": len(engine.adapters),
                             "queue": server.scheduler.queue_depth}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.scheduler.queue_depth, server.scheduler.running),
                                 media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, server=server)
    return app
