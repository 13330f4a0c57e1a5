"""What every route shares: the engine, its scheduler, the library, the routers and the metrics,
and the steps between a validated request body and the scheduler (plan the mixture, submit).

All model work (routing with a DLP encoder that may be the base model, prompt log-probs, Arrow and
MoLE, adapter swaps) runs on the scheduler's thread: the fused layers hold per-forward state, so a
second thread using the model would race with the running batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..engine import GenerationRequest, SamplingParams
from ..engine.scheduler import QueueFull, Scheduler, SchedulerStopped
from ..errors import LoramuxError
from ..routers.abstention import in_forward, screen
from .metrics import ServerMetrics

log = logging.getLogger("loramux.server")

if TYPE_CHECKING:
    from ..engine import Engine
    from ..library import Library
    from ..routers.routing import Routing
    from .protocol import LoramuxOptions

ROUTERS = ("auto", "dlp", "arrow", "mole")


@dataclass
class ServerConfig:
    api_keys: frozenset[str] = frozenset()  # empty: no auth (then the CLI binds loopback only)
    admin_keys: frozenset[str] = frozenset()  # empty: the adapter lifecycle endpoints are off
    adapter_root: str | None = None  # POST /v1/adapters loads PEFT dirs only from below this dir
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20  # sized and chunked bodies alike
    max_tokens_limit: int = 1024
    max_prompt_tokens: int | None = None  # default: the model's context
    default_max_tokens: int = 16  # OpenAI's default for completions
    request_timeout_s: float = 600.0  # a request still unfinished after this is cancelled (504)
    # CPU fp32: serve from oneDNN-prepacked base weights (cpu_linear.py: 1.7x per projection at
    # 16 decode rows on the 2-core CPU), at the price of a second copy of the base weights.
    pack_linears: bool = True
    # Keys and values of this many recent prompt tokens, reused by prompts that start the same way
    # (engine/prefix_cache.py; 46 KB a token for SmolLM2-135M in fp32); 0: off.
    prefix_cache_tokens: int = 4096
    routers: dict[str, Any] = field(default_factory=dict)  # name -> router, built lazily


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = ("rate_limit_error" if self.status == 429 else "invalid_request_error" if self.status < 500
                else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def failure(e: BaseException, request_id: str) -> ApiError:
    """The answer for an exception that ended a request: bad input is the client's (400), anything
    else is ours (500, with the request id the server logged its traceback under)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, SchedulerStopped):
        return ApiError(503, str(e), code="shutting_down")
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, LoramuxError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error while serving request {request_id} ({type(e).__name__}); the server "
                         f"logged it under that id, and no other request was affected", code="internal_error")


@dataclass
class Plan:
    """How a request is served: one mixture (and routing) per prompt, or an in-forward router."""

    mixtures: list[dict[str, float] | None]
    routings: list["Routing | None"]
    router: Any = None  # Arrow / MoLE: weights come from inside the forward

    def router_for(self, k: int) -> Any:
        """The in-forward router of prompt k: none where the out-of-library test abstained (its
        mixture then is the library's general adapter, or None: the base model)."""
        routing = self.routings[k]
        return None if routing is not None and routing.abstained else self.router


class Server:
    def __init__(self, engine: "Engine", library: "Library | None", config: ServerConfig):
        self.engine, self.library, self.config = engine, library, config
        if config.pack_linears:
            from ..cpu_linear import pack_linears

            pack_linears(engine.fused.base.model)  # no-op off CPU, for other dtypes, or without oneDNN
        self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                   prefix_cache_tokens=config.prefix_cache_tokens)
        self.metrics = ServerMetrics()
        self.scheduler.observers.append(self.metrics.observe)
        self.base_id = engine.base.model_id
        self.recent: deque = deque(maxlen=50)  # the web view's "recent requests"
        self.live: dict[int, tuple[dict, object]] = {}  # request id -> (its entry, its engine row): in flight
        self._models: dict[int, str] = {}  # request object id -> the model name it asked for
        self._unloadable: set = set()  # stored router versions that failed to load (not retried)
        self._general = library.general if library is not None else None  # what the cached routers were built with
        self.scheduler.observers.append(self._remember)
        self.warming = threading.Event()  # set while --compile's warm-up runs (app.py)
        self.stopping = threading.Event()
        self.lifecycle = threading.Lock()  # the warm-up's scheduler start against the shutdown's stop

    def _refuse_while_warming(self) -> None:
        if self.warming.is_set():
            raise ApiError(503, "the server is compiling its decode step (--compile warm-up, minutes on a first run); "
                                "retry once GET /ready answers 200", code="warming_up", headers={"Retry-After": "5"})

    # ------------------------------------------------------------------ the web view's book-keeping
    @staticmethod
    def _mixture_of(routing, mixture) -> dict:
        if routing is not None and not routing.abstained:
            return {"adapters": list(routing.adapters), "weights": list(routing.weights)}
        return {"adapters": list((mixture or {}).keys()), "weights": list((mixture or {}).values())}

    def _remember(self, event: str, data: dict) -> None:
        # Runs on the scheduler thread; the web view reads `live` and `recent` from the event loop,
        # so both are only ever replaced or appended to whole entries.
        key = id(data.get("request"))
        if event == "admitted":
            req = data["row"].request
            entry = {"model": self._models.get(key, ""), **self._mixture_of(req.routing, req.mixture)}
            self.live[key] = (entry, data["row"])
        elif event in ("cancelled", "refused", "failed"):
            self.live.pop(key, None)
            self._models.pop(key, None)
        elif event == "finished":
            self.live.pop(key, None)
            result = data["result"]
            self.recent.appendleft({"model": self._models.pop(key, ""), **self._mixture_of(result.routing, result.mixture),
                                    "tokens": len(result.token_ids), "seconds": result.seconds})

    def live_requests(self) -> list[dict]:
        now = time.perf_counter()
        return [{**entry, "tokens": len(row.tokens), "seconds": now - row.started}
                for entry, row in list(self.live.values())]

    # ------------------------------------------------------------------ the model's thread
    async def on_model_thread(self, fn: Callable[[], Any], *, exclusive: bool = False) -> Any:
        """Run `fn` on the scheduler's thread and wait for it (ApiErrors it raises pass through)."""
        self._refuse_while_warming()
        try:
            return await asyncio.wrap_future(self.scheduler.call(fn, exclusive=exclusive))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # queue full 429, shutting down 503, bad input 400, ours 500
            raise failure(e, f"call-{id(fn):x}") from None

    # ------------------------------------------------------------------ routing
    def router(self, name: str):
        """The router a model name stands for, built on first use (call on the model's thread).

        A stored DLP router is re-read when the library holds a newer one (a grown library's
        retrained router): the swap is one assignment on this thread, so each request routes
        wholly with the old router or wholly with the new. Until the new one is stored, the old
        one keeps routing between the adapters it knows."""
        general = self.library.general if self.library is not None else None
        if general != self._general:  # `loramux library general` while serving: routers see it now
            self._general = general
            self._unloadable.clear()  # a stored router refused for routing to it may load now
            self.adapters_changed()
        cached = self.config.routers.get(name)
        if cached is not None and not self._newer_dlp(name, cached):
            return cached
        from ..routers import load_router

        if self.library is None:
            raise ApiError(404, f"model {name!r} needs a library; the server runs without one", "model",
                           "model_not_found")
        kind, _, stored = name.partition(":")
        kind = "dlp" if kind == "auto" else kind
        try:
            if kind == "dlp":
                from ..routers.sentence import DlpRouter

                reuse = cached.encoder if isinstance(cached, DlpRouter) else None
                router = DlpRouter.load(self.library, stored or "dlp", base=self.engine.base, encoder=reuse)
            else:
                router = load_router(self.library, kind, fused=self.engine.fused, **({"name": stored} if stored else {}))
        except LoramuxError as e:
            if cached is not None:  # a stored router mid-update: the one in hand still routes
                self._unloadable.add(self._stored_entry(name))  # not retried on every request
                return cached
            raise ApiError(404, f"model {name!r}: {e}", "model", "model_not_found") from None
        self.config.routers[name] = router
        return router

    def out_of_library_test(self):
        """The test in front of the in-forward routers (routers/abstention.py): the library's stored
        DLP router, when it carries one (call on the model's thread). A stored version that fails
        to load is not retried on every request; the in-forward routers then serve every prompt."""
        if self.library is None or self.library.routers().get("dlp", {}).get("kind") != "dlp":
            return None
        if self._stored_entry("dlp") in self._unloadable and "dlp" not in self.config.routers:
            return None
        try:
            router = self.router("dlp")
        except Exception as e:  # unreadable, or stored for other adapters than the library's now
            log.warning("the stored dlp router cannot screen arrow/mole requests: %s", e)
            self._unloadable.add(self._stored_entry("dlp"))
            return None
        return router if router.abstain is not None else None

    def _newer_dlp(self, name: str, router) -> bool:
        """Whether the library stores another version of this DLP router than the one in hand."""
        stored_dir = getattr(router, "stored_dir", None)
        if self.library is None or stored_dir is None:
            return False
        current = self._stored_entry(name)
        return current is not None and current != stored_dir and current not in self._unloadable

    def _stored_entry(self, name: str) -> str | None:
        entry = self.library.routers().get(name.partition(":")[2] or "dlp") if self.library is not None else None
        return entry["dir"] if entry else None

    def adapters_changed(self, added: str | None = None) -> None:
        """Drop the routers a change of adapters makes stale. Adding an adapter keeps the DLP
        routers (they route between adapters that are all still served, until their retrained
        successor is stored); any other change rebuilds every router."""
        from ..routers.sentence import DlpRouter

        keep = {n: r for n, r in self.config.routers.items()
                if added is not None and isinstance(r, DlpRouter) and added not in r.adapters}
        self.config.routers.clear()
        self.config.routers.update(keep)

    def router_names(self) -> list[str]:
        """The router model names this server answers to (GET /v1/models, the web view)."""
        stored = self.library.routers() if self.library is not None else {}
        return (["auto"] if "dlp" in stored else []) + sorted(stored) + (["arrow"] if self.engine.adapters else [])

    def lora_mixture(self, entries) -> dict[str, float]:
        """llama.cpp's `lora` list -> a mixture: ids index GET /lora-adapters, names are accepted."""
        names = self.engine.adapters
        mix: dict[str, float] = {}
        for k, entry in enumerate(entries):
            if isinstance(entry.id, int):
                if entry.id >= len(names):
                    raise ApiError(400, f"lora.{k}.id: no adapter has id {entry.id}; GET /lora-adapters lists ids "
                                        f"0..{len(names) - 1}", f"lora.{k}.id")
                name = names[entry.id]
            elif entry.id in names:
                name = entry.id
            else:
                raise ApiError(400, f"lora.{k}.id: adapter {entry.id!r} is not loaded; GET /lora-adapters lists "
                                    f"{names}", f"lora.{k}.id")
            if name in mix:
                raise ApiError(400, f"lora.{k}.id: adapter {name!r} is listed twice", f"lora.{k}.id")
            mix[name] = float(entry.scale)
        return {n: w for n, w in mix.items() if w != 0.0}

    async def plan(self, model: str, opts: "LoramuxOptions", lora, route_texts: list[str]) -> Plan:
        """The mixture of each prompt: an explicit mix, an adapter, the base model, or a router's
        choice (routed once per prompt, on the model's thread)."""
        n = len(route_texts)
        if opts.mix is not None:
            unknown = [name for name in opts.mix if name not in self.engine.adapters]
            if unknown:
                raise ApiError(400, f"loramux.mix.{unknown[0]}: adapter {unknown[0]!r} is not loaded; loaded adapters: "
                                    f"{self.engine.adapters}", f"loramux.mix.{unknown[0]}")
            return Plan([{k: float(v) for k, v in opts.mix.items()}] * n, [None] * n)
        if lora is not None:
            mix = self.lora_mixture(lora) or None  # all-zero llama.cpp scales: the base model
            return Plan([mix] * n, [None] * n)
        if model in ("base", self.base_id):
            return Plan([None] * n, [None] * n)
        if model in self.engine.adapters:
            return Plan([{model: 1.0}] * n, [None] * n)
        if model.partition(":")[0] not in ROUTERS:
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists the base model, "
                                f"adapters and routers", "model", "model_not_found")
        options = opts.router_options()

        def route() -> Plan:
            router = self.router(model)
            if in_forward(router):
                abstain = options.pop("abstain", True)
                if options:
                    raise ApiError(400, f"router options {sorted(options)} apply to dlp; {model} was configured "
                                        f"at start (it takes `abstain` alone)", f"loramux.{sorted(options)[0]}")
                screened = [self.servable(r) for r in
                            screen(self.out_of_library_test() if abstain else None, route_texts, router)]
                return Plan([r.mixture if r is not None else None for r in screened], screened, router)
            try:
                routings = [self.servable(r) for r in router.route(route_texts, **options)]
            except (LoramuxError, TypeError) as e:
                raise ApiError(400, f"routing failed: {e}", "loramux") from None
            return Plan([r.mixture for r in routings], list(routings))

        return await self.on_model_thread(route)

    def servable(self, routing: "Routing | None") -> "Routing | None":
        """An abstention to a general adapter this server does not hold (unloaded by an admin) goes
        to the base model instead, and says so."""
        if routing is None or not routing.general or routing.general in self.engine.adapters:
            return routing
        return dataclasses.replace(routing, general="", reason=f"{routing.reason}; the general adapter "
                                                               f"{routing.general!r} is not loaded: base model")

    def routing_echo(self, mixture, router, routing, result, explain: bool) -> dict:
        versions = {}
        if self.library is not None:
            for name in (mixture or {}):
                if name in self.library:
                    versions[name] = self.library.get(name).version
        out: dict[str, Any] = {"mixture": mixture, "adapter_versions": versions}
        r = routing or (result.routing if result is not None else None)
        if r is not None:
            out["router"] = r.router
            out["adapters"], out["weights"] = list(r.adapters), list(r.weights)
            if r.abstained:
                out["abstained"], out["reason"] = True, r.reason
                if r.general:
                    out["general"] = r.general
            if explain:
                out["explain"] = r.to_dict()
        elif router is not None:
            out["router"] = router.kind
        return out

    # ------------------------------------------------------------------ requests
    def sampling(self, body, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
                              seed=body.seed, stop=body.stops(), logprobs=logprobs,
                              ignore_eos=body.loramux.ignore_eos)

    def prompt_ids(self, prompt: str | list[int], rendered_chat: bool = False) -> list[int]:
        """Token ids of a prompt; a rendered chat template already holds its special tokens."""
        if isinstance(prompt, list):
            return list(prompt)
        return self.engine.base.tokenizer(prompt, add_special_tokens=not rendered_chat)["input_ids"]

    def check_prompt(self, ids: list[int], max_new: int, param: str = "prompt") -> None:
        limit = self.config.max_prompt_tokens
        if limit and len(ids) > limit:
            raise ApiError(400, f"{param}: {len(ids)} tokens exceed this server's limit of {limit}", param)
        try:
            self.engine.check_length(len(ids), max_new)
        except LoramuxError as e:
            raise ApiError(400, f"{param}: {e}", param) from None

    def submit(self, request: GenerationRequest, router, on_delta=None, *, ids: list[int] | None = None,
               model: str = "", tag: str = ""):
        """Queue one generation (`ids`: its prompt's tokens, when already known)."""
        self._refuse_while_warming()
        self._models[id(request)] = model
        try:
            return self.scheduler.submit(request, on_delta, router=router, prompt_ids=ids, tag=tag)
        except (QueueFull, SchedulerStopped) as e:
            self._models.pop(id(request), None)
            raise failure(e, tag) from None
