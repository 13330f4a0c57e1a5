"""`loramux serve`: an OpenAI-compatible HTTP server over the engine, thin by design.

`model` picks what serves a request: `base`, an adapter name, or a router (`auto` = the stored
DLP router, `dlp`, `arrow`, `mole` / `mole:<name>`). The body's `loramux` object (the `openai`
client's `extra_body={"loramux": {...}}`) may give an explicit mixture `{"mix": {name: w}}`,
router options (`top_p`, `top_k`, `temperature`) and `"explain": true`. Every response echoes the
routing actually used. Requests run through one continuous-batching scheduler, so requests with
different mixtures share forwards.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..engine import GenerationRequest, SamplingParams
from ..engine.scheduler import QueueFull, Scheduler
from ..errors import LoramuxError
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..engine import Engine
    from ..library import Library

ROUTERS = ("auto", "dlp", "arrow", "mole")


@dataclass
class ServerConfig:
    api_keys: frozenset[str] = frozenset()  # empty: no auth (then the CLI binds loopback only)
    admin_keys: frozenset[str] = frozenset()  # empty: the adapter lifecycle endpoints are off
    adapter_root: str | None = None  # POST /v1/adapters loads PEFT dirs only from below this dir
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 1024
    max_prompt_tokens: int | None = None  # default: the model's context
    default_max_tokens: int = 16  # OpenAI's default for completions
    request_timeout_s: float = 600.0  # a request still unfinished after this is cancelled (504)
    # CPU fp32: serve from oneDNN-prepacked base weights (cpu_linear.py: 1.7x per projection at
    # 16 decode rows on the 2-core CPU), at the price of a second copy of the base weights.
    pack_linears: bool = True
    routers: dict[str, Any] = field(default_factory=dict)  # name -> router, built lazily


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def _body_schema(kind: str, max_tokens: int) -> dict:
    """The request body as OpenAPI documents it (handlers still validate themselves, with errors
    that name the bad value); fuzzers such as schemathesis generate requests from it."""
    mix = {"type": "object", "additionalProperties": {"type": "number"}}
    ext = {"type": "object", "properties": {"mix": mix, "explain": {"type": "boolean"}, "top_p": {"type": "number"},
                                            "top_k": {"type": "integer"}, "ignore_eos": {"type": "boolean"}}}
    props = {"model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 0, "maximum": max_tokens},
             "temperature": {"type": "number"}, "top_p": {"type": "number"}, "seed": {"type": "integer"},
             "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
             "stream": {"type": "boolean"}, "loramux": ext}
    if kind == "chat":
        props["messages"] = {"type": "array", "items": {"type": "object", "required": ["role", "content"],
                                                        "properties": {"role": {"type": "string"},
                                                                       "content": {"type": "string"}}}}
        required = ["model", "messages"]
    else:
        props.update({"prompt": {"type": "string"}, "echo": {"type": "boolean"},
                      "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}})
        required = ["model", "prompt"]
    schema = {"type": "object", "required": required, "properties": props}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error_body(e: ApiError) -> dict:
    kind = "rate_limit_error" if e.status == 429 else "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


class Server:
    """What the routes share: engine, scheduler, library, routers, metrics."""

    def __init__(self, engine: "Engine", library: "Library | None", config: ServerConfig = ServerConfig()):
        self.engine, self.library, self.config = engine, library, config
        if config.pack_linears:
            from ..cpu_linear import pack_linears

            pack_linears(engine.fused.base.model)  # no-op off CPU, for other dtypes, or without oneDNN
        self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue)
        self.metrics = ServerMetrics()
        self.scheduler.observers.append(self.metrics.observe)
        self.base_id = engine.base.model_id
        from collections import deque

        self.recent: deque = deque(maxlen=50)  # the web view's "recent requests"
        self.live: dict[int, tuple[dict, object]] = {}  # request id -> (its entry, its engine row): in flight
        self._models: dict[int, str] = {}  # request object id -> the model name it asked for
        self.scheduler.observers.append(self._remember)

    @staticmethod
    def _mixture_of(routing, mixture) -> dict:
        if routing is not None:
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
        elif event in ("cancelled", "refused"):
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

    # ------------------------------------------------------------------ routing
    def router(self, name: str):
        if name in self.config.routers:
            return self.config.routers[name]
        from ..routers import load_router

        if self.library is None:
            raise ApiError(404, f"model {name!r} needs a library; the server runs without one", "model",
                           "model_not_found")
        kind, _, stored = name.partition(":")
        kind = "dlp" if kind == "auto" else kind
        try:
            if kind == "dlp":
                router = load_router(self.library, "dlp", base=self.engine.base)
            else:
                router = load_router(self.library, kind, fused=self.engine.fused, **({"name": stored} if stored else {}))
        except LoramuxError as e:
            raise ApiError(404, f"model {name!r}: {e}", "model", "model_not_found") from None
        self.config.routers[name] = router
        return router

    def plan(self, model: str, ext: dict, route_text: str) -> tuple[dict | None, Any, Any]:
        """(mixture, in-forward router or None, sentence routing or None) for a request."""
        if not isinstance(ext, dict):
            raise ApiError(400, "'loramux' must be an object", "loramux")
        mix = ext.get("mix")
        if mix is not None:
            if not isinstance(mix, dict) or not mix or not all(isinstance(w, (int, float)) for w in mix.values()):
                raise ApiError(400, f"loramux.mix must be a non-empty object of adapter: weight; got {mix!r}", "loramux.mix")
            return {str(k): float(v) for k, v in mix.items()}, None, None
        if model in ("base", self.base_id):
            return None, None, None
        if model in self.engine.adapters:
            return {model: 1.0}, None, None
        if model.partition(":")[0] in ROUTERS:
            router = self.router(model)
            options = {k: ext[k] for k in ("top_p", "top_k", "temperature") if k in ext}
            if getattr(router, "granularity", "sequence") != "sequence":
                if options:
                    raise ApiError(400, f"router options {sorted(options)} apply to dlp; {model} was configured "
                                        f"at start", "loramux")
                return None, router, None
            try:
                routing = router.route([route_text], **options)[0] if options else router.route([route_text])[0]
            except (LoramuxError, TypeError) as e:
                raise ApiError(400, f"routing failed: {e}", "loramux") from None
            return routing.mixture, None, routing
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists the base model, "
                            f"adapters and routers", "model", "model_not_found")

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
            if explain:
                out["explain"] = r.to_dict()
        elif router is not None:
            out["router"] = router.kind
        return out

    # ------------------------------------------------------------------ requests
    def sampling(self, body: dict) -> SamplingParams:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", self.config.default_max_tokens))
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be an integer in [1, {self.config.max_tokens_limit}]; "
                                f"got {max_tokens!r}", "max_tokens")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                                  top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"), stop=stop,
                                  logprobs=body.get("logprobs"),
                                  ignore_eos=bool((body.get("loramux") or {}).get("ignore_eos")))
        except (LoramuxError, TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None

    def check_unsupported(self, body: dict) -> None:
        if body.get("n", 1) != 1:
            raise ApiError(400, "n > 1 is not supported; send separate requests", "n")
        for key in ("best_of", "suffix"):
            if body.get(key):
                raise ApiError(400, f"{key!r} is not supported by this server yet", key)

    def prompt_logprobs(self, prompt_ids: list[int], mixture, top_n: int | None) -> list:
        """(token, logprob or None for the first, top-N) for each prompt token, under the mixture.
        Runs on the scheduler's thread, alone, like any other use of the model."""
        import torch

        def score():
            model = self.engine.base.model
            mix = self.engine.sequence_mixture([mixture])
            with torch.no_grad(), self.engine.fused.mixture(mix):
                logits = model(input_ids=torch.tensor([prompt_ids])).logits[0].float()
            self.engine.fused.release()
            logp = torch.log_softmax(logits, dim=-1)
            out = [(prompt_ids[0], None, None)]
            for j in range(1, len(prompt_ids)):
                row = logp[j - 1]
                top = row.topk(top_n) if top_n else None
                out.append((prompt_ids[j], float(row[prompt_ids[j]]),
                            {int(i): float(v) for i, v in zip(top.indices, top.values)} if top is not None else None))
            return out
        try:
            return self.scheduler.call(score)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None

    def openai_logprobs(self, entries: list, offset0: int = 0) -> dict:
        """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
        tok = self.engine.base.tokenizer
        tokens, offsets, at = [], [], offset0
        for token_id, _, _ in entries:
            piece = tok.decode([token_id])
            tokens.append(piece)
            offsets.append(at)
            at += len(piece)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {tok.decode([i]): v for i, v in top.items()}
                                 for _, _, top in entries],
                "text_offset": offsets}

    # ------------------------------------------------------------------ adapter lifecycle
    def load_adapter(self, name: str, path: str, expected_version: int | None) -> dict:
        """Add (or replace) a PEFT dir from the allowed root to the library and the engine. Runs on
        the scheduler's thread once the running batch drains, so requests in flight finish on
        the version they started with."""
        from pathlib import Path

        root = self.config.adapter_root
        if not root:
            raise ApiError(403, "loading adapters is off: start the server with an adapter root", code="forbidden")
        if self.library is None:
            raise ApiError(400, "the server runs without a library to add adapters to")
        target = Path(path).expanduser().resolve()
        if not target.is_relative_to(Path(root).expanduser().resolve()):
            raise ApiError(403, f"path {path!r} is outside the allowed adapter root", "path", "forbidden")

        def swap() -> dict:
            current = self.library.get(name).version if name in self.library else None
            if expected_version is not None and current != expected_version:
                raise ApiError(409, f"adapter {name!r} is at version {current}, not the expected {expected_version}",
                               "expected_version", "version_mismatch")
            spec = self.library.add(name, target, base=self.engine.base, replace=current is not None)
            if name in self.engine.adapters:
                self.engine.unload(name)
            self.engine.load(name)
            self.config.routers.clear()  # routers rebuild over the new set of adapters
            return {"name": name, "version": spec.version, "rank": spec.rank}

        return self.scheduler.call(swap)

    def unload_adapter(self, name: str):
        def drop() -> dict:
            if name not in self.engine.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded", "name", "model_not_found")
            self.engine.unload(name)
            self.config.routers.clear()
            return {"name": name, "unloaded": True}

        return self.scheduler.call(drop)

    def submit(self, request: GenerationRequest, router, on_delta=None, model: str = ""):
        ids = self.engine._row(request).prompt_ids  # tokenized once: the scheduler reuses them
        limit = self.config.max_prompt_tokens
        if limit and len(ids) > limit:
            raise ApiError(400, f"prompt of {len(ids)} tokens exceeds this server's limit of {limit}", "prompt")
        self._models[id(request)] = model
        try:
            return self.scheduler.submit(request, on_delta, router=router, prompt_ids=ids)
        except QueueFull as e:
            self._models.pop(id(request), None)
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None


def create_app(engine: "Engine", library: "Library | None" = None, config: ServerConfig | None = None):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    server = Server(engine, library, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="loramux", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        server.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(_error_body(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(LoramuxError)
    async def bad_input(request: Request, e: LoramuxError):
        return await api_error(request, ApiError(400, str(e)))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1") or path == "/metrics":
            keys = server.config.api_keys
            if keys:
                auth = request.headers.get("authorization", "")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                # constant-time comparison against every key, so timing does not reveal a prefix
                if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
                    e = ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")
                    return JSONResponse(_error_body(e), status_code=401)
            size = request.headers.get("content-length")
            if size and int(size) > server.config.max_body_bytes:
                e = ApiError(413, f"request body of {size} bytes exceeds {server.config.max_body_bytes}")
                return JSONResponse(_error_body(e), status_code=413)
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "'model' is required: base, an adapter name, or a router (auto, dlp, arrow, mole)",
                           "model")
        return body

    async def run(kind: str, body: dict, request: GenerationRequest, router, mixture, routing):
        loop = asyncio.get_running_loop()
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        explain = bool((body.get("loramux") or {}).get("explain"))
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text: str | None, finish: str | None) -> dict:
            if kind == "chat":
                return {"index": 0, "finish_reason": finish,
                        **({"delta": {"content": text}} if body.get("stream") else
                           {"message": {"role": "assistant", "content": text}})}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def with_logprobs(ch: dict, result) -> dict:
            if kind == "completion" and result.logprobs is not None:
                ch["logprobs"] = server.openai_logprobs([(t, lp, top or None) for t, lp, top in result.logprobs])
            return ch

        def usage(result) -> dict:
            return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                    "total_tokens": result.prompt_tokens + len(result.token_ids)}

        if not body.get("stream"):
            future = server.submit(request, router, model=body["model"])
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(future), server.config.request_timeout_s)
            except asyncio.TimeoutError:
                future.cancel()
                raise ApiError(504, f"the request did not finish within {server.config.request_timeout_s:g}s") from None
            finally:
                future.cancel()  # no-op once done; frees the row if the client disconnected
            server.metrics.requests.labels(f"/v1/{'chat/' if kind == 'chat' else ''}completions", "200").inc()
            return JSONResponse({
                "id": rid, "object": obj, "created": created, "model": body["model"],
                "choices": [with_logprobs(choice(result.text, result.finish_reason), result)], "usage": usage(result),
                "loramux": server.routing_echo(mixture, router, routing, result, explain)})

        pieces: asyncio.Queue = asyncio.Queue()
        future = server.submit(request, router, lambda d: loop.call_soon_threadsafe(pieces.put_nowait, d),
                               model=body["model"])
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        obj_chunk = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events():
            try:
                async for event in stream_events():
                    yield event
            finally:  # the client disconnected (or the stream ended): free the row at once
                future.cancel()

        async def stream_events():
            first = {"id": rid, "object": obj_chunk, "created": created, "model": body["model"],
                     "choices": [choice("" if kind == "completion" else None, None)],
                     "loramux": server.routing_echo(mixture, router, routing, None, explain)}
            if kind == "chat":
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield f"data: {json.dumps(first)}\n\n"
            while (piece := await pieces.get()) is not None:
                yield f"data: {json.dumps({'id': rid, 'object': obj_chunk, 'created': created, 'model': body['model'], 'choices': [choice(piece, None)]})}\n\n"
            try:
                result = future.result()
            except LoramuxError as e:
                yield f"data: {json.dumps(_error_body(ApiError(400, str(e))))}\n\n"
                yield "data: [DONE]\n\n"
                return
            last = {"id": rid, "object": obj_chunk, "created": created, "model": body["model"],
                    "choices": [choice("" if kind == "completion" else None, result.finish_reason)],
                    "usage": usage(result), "loramux": server.routing_echo(mixture, router, routing, result, explain)}
            if kind == "chat":
                last["choices"][0]["delta"] = {}
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", openapi_extra=_body_schema("completion", server.config.max_tokens_limit))
    async def completions(request: Request):
        body = await body_of(request)
        server.check_unsupported(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        mixture, router, routing = server.plan(body["model"], body.get("loramux") or {}, prompt)
        echo, n_lp = bool(body.get("echo")), body.get("logprobs")
        if n_lp is not None and not (isinstance(n_lp, int) and 0 <= n_lp <= 20):
            raise ApiError(400, f"logprobs must be an integer in [0, 20]; got {n_lp!r}", "logprobs")
        if echo and (router is not None or body.get("stream")):
            raise ApiError(400, "echo works with fixed mixtures and adapters, without streaming", "echo")
        if body.get("max_tokens") == 0:
            if not echo:
                raise ApiError(400, "max_tokens 0 only makes sense with echo (score the prompt)", "max_tokens")
            return await echo_only(body, prompt, mixture, routing, n_lp)
        req = GenerationRequest(prompt, mixture, server.sampling(body), chat=False, routing=None)
        if echo:
            return await echo_and_generate(body, req, mixture, routing, n_lp)
        return await run("completion", body, req, router, mixture, routing)

    async def echo_only(body: dict, prompt: str, mixture, routing, n_lp):
        ids = engine._row(GenerationRequest(prompt, mixture, SamplingParams(max_new_tokens=1), chat=False)).prompt_ids
        entries = await asyncio.wrap_future(server.prompt_logprobs(ids, mixture, n_lp))
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": prompt, "finish_reason": "length",
                         "logprobs": server.openai_logprobs(entries) if n_lp is not None else None}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)},
            "loramux": server.routing_echo(mixture, None, routing, None, False)})

    async def echo_and_generate(body: dict, req: GenerationRequest, mixture, routing, n_lp):
        ids = engine._row(req).prompt_ids
        prompt_entries = await asyncio.wrap_future(server.prompt_logprobs(ids, mixture, n_lp))
        result = await asyncio.wrap_future(server.submit(req, None))
        logprobs = None
        if n_lp is not None:
            logprobs = server.openai_logprobs(prompt_entries + [(t, lp, top or None) for t, lp, top in result.logprobs])
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": req.prompt + result.text, "finish_reason": result.finish_reason,
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                      "total_tokens": result.prompt_tokens + len(result.token_ids)},
            "loramux": server.routing_echo(mixture, None, routing, result, False)})

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("chat", server.config.max_tokens_limit))
    async def chat_completions(request: Request):
        body = await body_of(request)
        server.check_unsupported(body)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        mixture, router, routing = server.plan(body["model"], body.get("loramux") or {}, users[-1] if users else "")
        tok = engine.base.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                           tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        req = GenerationRequest(text, mixture, server.sampling(body), chat=False)
        return await run("chat", body, req, router, mixture, routing)

    def require_admin(request: Request) -> None:
        keys = server.config.admin_keys
        if not keys:
            raise ApiError(403, "adapter lifecycle endpoints are off: start the server with admin keys", code="forbidden")
        token = request.headers.get("x-admin-key", "")
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            raise ApiError(403, "missing or invalid admin key (X-Admin-Key header)", code="forbidden")

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        require_admin(request)
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, "body must be {name, path[, expected_version]}")
        future = server.load_adapter(body["name"], body["path"], body.get("expected_version"))
        return await asyncio.wrap_future(future)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        require_admin(request)
        return await asyncio.wrap_future(server.unload_adapter(name))

    @app.get("/", response_class=HTMLResponse)
    async def web_view():
        from .web import PAGE

        return PAGE

    @app.get("/v1/loramux/library")
    async def library_view():
        adapters = []
        for spec in (library.list() if library is not None else []):
            adapters.append({"name": spec.name, "tasks": list(spec.tasks), "rank": spec.rank, "version": spec.version,
                             "loaded": spec.name in engine.adapters})
        stored = library.routers() if library is not None else {}
        routers = (["auto"] if "dlp" in stored else []) + sorted(stored) + (["arrow"] if engine.adapters else [])
        return {"base": server.base_id, "adapters": adapters, "routers": routers or ["base"]}

    @app.get("/v1/loramux/recent")
    async def recent():
        return {"live": server.live_requests(), "requests": list(server.recent)}

    @app.post("/v1/loramux/route")
    async def route_preview(request: Request):
        """What a router would choose for a prompt, and why, without generating."""
        body = await body_of(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        model = body["model"]
        if model.partition(":")[0] not in ROUTERS:
            raise ApiError(400, f"{model!r} is not a router; use one of {list(ROUTERS)}", "model")
        router = server.router(model)
        routing = (await asyncio.wrap_future(server.scheduler.call(lambda: router.route([prompt])[0])))
        return routing.to_dict()

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": "base", "object": "model", "created": created, "owned_by": "loramux", "parent": None,
                 "root": server.base_id}]
        for name in engine.adapters:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "loramux",
                         "parent": server.base_id, "kind": "adapter",
                         "version": library.get(name).version if library is not None and name in library else None})
        stored = library.routers() if library is not None else {}
        for name in (["auto"] if "dlp" in stored else []) + sorted(stored) + (["arrow"] if engine.adapters else []):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "loramux",
                         "parent": server.base_id, "kind": "router"})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        alive = server.scheduler._thread is not None and server.scheduler._thread.is_alive()
        return JSONResponse({"ready": alive, "adapters": len(engine.adapters), "queue": server.scheduler.queue_depth},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.scheduler.queue_depth, server.scheduler.running),
                                 media_type="text/plain; version=0.0.4")

    return app
