"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and llama.cpp
server's GET /lora-adapters (whose ids a request's `lora` field names).

`model` picks what serves a request: `base`, an adapter name, or a router (`auto` = the stored
DLP router, `dlp`, `arrow`, `mole` / `mole:<name>`). The body's `loramux` object may give an
explicit mixture `{"mix": {name: w}}`, router options and `"explain": true`; every response echoes
the routing actually used. Bodies are validated by the models of `protocol.py` before a handler
runs; handlers never re-check a field.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and the
# request models are made per app (`protocol.request_models`), inside `add_openai_routes`.

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, StreamingResponse

from ..engine import GenerationRequest
from ..engine.logprobs import prompt_logprobs
from .core import ApiError, Server, failure
from .protocol import (ERRORS, ChatResponse, CompletionResponse, LoraAdapterInfo, ModelCard, ModelList,
                       request_models)


@dataclass
class _Choice:
    """One choice of a response: prompt k's j-th sample."""

    index: int
    prompt: int
    text: str  # the prompt's text (echo) or ""
    ids: list[int]
    request: GenerationRequest | None = None
    future: object = None
    prompt_entries: list = field(default_factory=list)  # echo + logprobs: the prompt's own entries
    routing: object = None


def _stream_doc(model) -> dict:
    return {200: {"model": model, "content": {"text/event-stream": {}}}, **ERRORS}


def add_openai_routes(app, server: Server) -> None:
    engine = server.engine
    tok = engine.base.tokenizer
    vocab = min(len(tok), engine.base.model.get_input_embeddings().num_embeddings)
    Completion, Chat = request_models(server.config.max_tokens_limit, vocab)

    # ------------------------------------------------------------------ shared steps
    def deadline_of(body) -> float:
        limit = server.config.request_timeout_s
        return min(limit, body.loramux.timeout_s) if body.loramux.timeout_s else limit

    async def within(deadline: float, body, awaitable):
        """Await a step of the request (routing, scoring) inside the request's own deadline."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request did not finish within {deadline_of(body):g}s") from None

    def lp_entries(result) -> list:
        return [(t, lp, top or None) for t, lp, top in (result.logprobs or [])]

    def completion_logprobs(entries: list, offset0: int = 0) -> dict:
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

    def chat_logprobs(entries: list) -> dict:
        def one(i: int, lp: float) -> dict:
            piece = tok.decode([i])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in (top or {}).items()]}
                            for t, lp, top in entries]}

    def usage(choices: list[_Choice], results: dict) -> dict:
        prompt = sum(len(ch.ids) for ch in {ch.prompt: ch for ch in choices}.values())
        completion = sum(len(r.token_ids) for r in results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def run(kind: str, body, choices: list[_Choice], plan, rid: str, finish, deadline: float):
        """Submit every choice, then answer: one JSON body, or an event stream."""
        explain = body.loramux.explain
        pieces: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            for ch in choices:
                on_delta = None
                if body.stream:
                    on_delta = (lambda i: lambda d: loop.call_soon_threadsafe(pieces.put_nowait, (i, d)))(ch.index)
                ch.future = server.submit(ch.request, plan.router_for(ch.prompt), on_delta, ids=ch.ids, model=body.model, tag=rid)
                ch.future.add_done_callback(
                    (lambda i: lambda f: loop.call_soon_threadsafe(pieces.put_nowait, (i, None)))(ch.index))
        except ApiError:
            for ch in choices:
                if ch.future is not None:
                    ch.future.cancel()
            raise

        def echo_of(ch: _Choice, result) -> dict:
            return server.routing_echo(plan.mixtures[ch.prompt], plan.router_for(ch.prompt),
                                       ch.routing or plan.routings[ch.prompt], result, explain)

        if not body.stream:
            try:
                results = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(ch.future) for ch in choices)),
                                                 max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(504, f"the request did not finish within {deadline_of(body):g}s") from None
            except Exception as e:
                raise failure(e, rid) from None
            finally:
                for ch in choices:
                    ch.future.cancel()  # no-op once done; frees the rows if the client left or one failed
            by_index = {ch.index: r for ch, r in zip(choices, results)}
            answers = [finish(ch, by_index[ch.index]) for ch in choices]
            if len({ch.prompt for ch in choices}) > 1:  # several prompts: each choice says how its prompt was routed
                for ch, answer in zip(choices, answers):
                    answer["loramux"] = echo_of(ch, by_index[ch.index])
            return {"id": rid, "created": int(time.time()), "model": body.model,
                    "choices": answers,
                    "usage": usage(choices, by_index), "loramux": echo_of(choices[0], results[0])}

        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(choice_list: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": body.model,
                                          "choices": choice_list, **extra}) + "\n\n"

        def piece(index: int, text: str | None, finish_reason: str | None) -> dict:
            if kind == "chat":
                return {"index": index, "delta": {} if text is None else {"content": text},
                        "finish_reason": finish_reason, "logprobs": None}
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

        async def events():
            done: dict[int, object] = {}
            try:
                first = [piece(ch.index, "" if kind == "completion" else None, None) for ch in choices]
                if kind == "chat":
                    for p in first:
                        p["delta"] = {"role": "assistant", "content": ""}
                yield chunk(first, loramux=echo_of(choices[0], None))
                index_of = {ch.index: ch for ch in choices}
                while len(done) < len(choices):
                    if not pieces.empty():  # the common case while tokens flow: no timer, no task
                        i, text = pieces.get_nowait()
                    else:
                        i, text = await within(deadline, body, pieces.get())
                    if text is not None:
                        yield chunk([piece(i, text, None)])
                        continue
                    if i in done:
                        continue
                    ch = index_of[i]
                    try:
                        result = ch.future.result()
                    except Exception as e:
                        raise failure(e, rid) from None
                    done[i] = result
                    end = piece(i, None if kind == "chat" else "", result.finish_reason)
                    if kind == "chat" and result.logprobs is not None:
                        end["logprobs"] = chat_logprobs(lp_entries(result))
                    yield chunk([end], loramux=echo_of(ch, result))
                if include_usage:
                    yield chunk([], usage=usage(choices, done))
            except ApiError as e:  # this request alone ends: an error event, then the stream closes
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:  # the client disconnected, or the stream ended: free every row at once
                for ch in choices:
                    if ch.future is not None:
                        ch.future.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def requests_for(body, texts: list[str], plan, sampling) -> list[GenerationRequest]:
        out = []
        for k, text in enumerate(texts):
            for j in range(body.n):
                # n samples of one seeded prompt: n different streams, each reproducible
                s = sampling if j == 0 or sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
                out.append(GenerationRequest(text, plan.mixtures[k], s, chat=False, routing=plan.routings[k]))
        return out

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions", response_model=None, responses=_stream_doc(CompletionResponse))
    async def completions(body: Completion):
        rid, deadline = f"cmpl-{uuid.uuid4().hex[:24]}", time.monotonic() + deadline_of(body)
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        ids = [server.prompt_ids(x) for x in prompts]
        texts = [x if isinstance(x, str) else tok.decode(x) for x in prompts]
        max_new = body.max_tokens if body.max_tokens is not None else server.config.default_max_tokens
        if max_new == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 only makes sense with echo (score the prompt)", "max_tokens")
        if len(ids) * body.n > server.config.max_queue:
            raise ApiError(400, f"n: {len(ids)} prompts x n = {len(ids) * body.n} choices exceed this server's queue "
                                f"of {server.config.max_queue}", "n")
        for k, x in enumerate(ids):
            server.check_prompt(x, max_new, "prompt" if len(ids) == 1 else f"prompt.{k}")
        plan = await within(deadline, body, server.plan(body.model, body.loramux, body.lora, texts))
        choices = [_Choice(k * body.n + j, k, texts[k] if body.echo else "", ids[k])
                   for k in range(len(prompts)) for j in range(body.n)]
        if body.echo:  # score each prompt once, under its routing (an in-forward router runs alone)
            for k in range(len(prompts)):
                score = await within(deadline, body, server.on_model_thread(
                    lambda k=k: prompt_logprobs(engine, ids[k], plan.mixtures[k], router=plan.router_for(k),
                                                top_n=body.logprobs), exclusive=plan.router_for(k) is not None))
                for ch in choices:
                    if ch.prompt == k:
                        ch.prompt_entries, ch.routing = score.entries, score.routing

        def finish(ch: _Choice, result) -> dict:
            entries = ch.prompt_entries + (lp_entries(result) if result is not None else [])
            text = ch.text + (result.text if result is not None else "")
            return {"index": ch.index, "text": text, "finish_reason": result.finish_reason if result else "length",
                    "logprobs": completion_logprobs(entries) if body.logprobs is not None else None}

        if max_new == 0:
            answer = {"id": rid, "created": int(time.time()), "model": body.model,
                      "choices": [finish(ch, None) for ch in choices],
                      "usage": usage(choices, {}),
                      "loramux": server.routing_echo(plan.mixtures[0], plan.router_for(0), choices[0].routing or
                                                     plan.routings[0], None, body.loramux.explain)}
        else:
            sampling = server.sampling(body, max_new, body.logprobs)
            for ch, req in zip(choices, requests_for(body, texts, plan, sampling)):
                ch.request = req
            answer = await run("completion", body, choices, plan, rid, finish, deadline)
            if isinstance(answer, StreamingResponse):
                return answer
        server.metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse({"object": "text_completion", **answer})

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", response_model=None, responses=_stream_doc(ChatResponse))
    async def chat_completions(body: Chat):
        rid, deadline = f"chatcmpl-{uuid.uuid4().hex[:24]}", time.monotonic() + deadline_of(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        templated = engine.formatter.use_chat_template
        if templated:
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the model's own template refuses this conversation (jinja's raise_exception)
                raise ApiError(400, f"messages: the model's chat template refuses them: {e}", "messages") from None
        else:
            text = "\n".join(m["content"] for m in messages)
        ids = server.prompt_ids(text, rendered_chat=templated)
        max_new = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                       server.config.default_max_tokens)
        server.check_prompt(ids, max_new, "messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        plan = await within(deadline, body, server.plan(body.model, body.loramux, body.lora, [users[-1] if users else text]))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = server.sampling(body, max_new, logprobs)
        choices = [_Choice(j, 0, "", ids) for j in range(body.n)]
        for ch, req in zip(choices, requests_for(body, [text], plan, sampling)):
            ch.request = req

        def finish(ch: _Choice, result) -> dict:
            return {"index": ch.index, "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": chat_logprobs(lp_entries(result)) if body.logprobs else None}

        answer = await run("chat", body, choices, plan, rid, finish, deadline)
        if isinstance(answer, StreamingResponse):
            return answer
        server.metrics.requests.labels("/v1/chat/completions", "200").inc()
        return JSONResponse({"object": "chat.completion", **answer})

    # ------------------------------------------------------------------ models
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models():
        created, library = int(time.time()), server.library
        data = [{"id": "base", "created": created, "root": server.base_id, "kind": "base"}]
        for name in engine.adapters:
            data.append({"id": name, "created": created, "parent": server.base_id, "kind": "adapter",
                         "version": library.get(name).version if library is not None and name in library else None})
        for name in server.router_names():
            data.append({"id": name, "created": created, "parent": server.base_id, "kind": "router"})
        return ModelList(data=[ModelCard(**d) for d in data])

    @app.get("/lora-adapters", response_model=list[LoraAdapterInfo], responses=ERRORS)
    async def lora_adapters():
        """llama.cpp server's adapter list: a request's `lora: [{"id": i, "scale": s}]` names these ids
        (names work too). Scales are per request here, so every listed scale is 0."""
        library = server.library
        return [LoraAdapterInfo(id=i, name=name, path=str(library.adapter_dir(name))
                                if library is not None and name in library else name)
                for i, name in enumerate(engine.adapters)]
