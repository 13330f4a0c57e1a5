"""Engine: batched generation where every request has its own adapter mixture.

One forward serves the whole batch: the fused layers apply each row's mixture (see
`fusion/layer.py`), so requests with different mixtures never wait for each other. The decode
loop itself is the scheduler's (`scheduler.py`), run synchronously here and on a thread by the
server, so batching, stopping and sampling live in one place. This module holds what a row is
(`_Row`: its tokens, stop rules, sampling and stream) and how requests become rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..data import PromptFormatter
from ..errors import LoramuxError
from ..fusion import FusedModel, SequenceMixture
from .request import GenerationRequest, GenerationResult
from .sampling import NonFiniteOutput, Pick, RowSampling

if TYPE_CHECKING:
    from ..library import Library
    from ..models import BaseModel
    from ..routers.routing import Router, TokenRouter

DeltaCallback = Callable[[int, str], None]  # (request index, new text)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still turn into a stop string (or finish a UTF-8 char)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Row:
    """Book-keeping of one request during generation."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], stop_ids: set[int]):
        self.request = request
        self.sampling = request.sampling
        self.prompt_ids = prompt_ids
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.generator: torch.Generator | None = None  # made on the logits' device at the first sample
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.logprobs: list[tuple[int, float, dict[int, float]]] | None = [] if self.sampling.logprobs is not None else None

    def wants(self, device: torch.device) -> RowSampling:
        """What this row asks of its next token (its seeded generator is made on `device` once)."""
        if self.generator is None and self.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return RowSampling(self.sampling.temperature, self.sampling.top_p, self.generator, self.sampling.logprobs)

    def take(self, chosen: Pick, tokenizer) -> tuple[int, str]:
        """Add the token picked for this row, with its log-probabilities if asked."""
        if not chosen.finite:
            raise NonFiniteOutput()
        if self.logprobs is not None:
            self.logprobs.append((chosen.token, chosen.logprob, chosen.top))
        return chosen.token, self.push(chosen.token, tokenizer)

    def push(self, token: int, tokenizer) -> str:
        """Add one token; return the text that can be shown now."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            for s in self.sampling.stop:
                if s in self.text:
                    self.text = self.text[: self.text.index(s)]
                    self.finish = "stop"
        if self.finish is None and len(self.tokens) >= self.sampling.max_new_tokens:
            self.finish = "length"
        end = len(self.text) if self.finish else len(self.text) - _held_back(self.text, self.sampling.stop)
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta

    def result(self) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(
            text=self.text, token_ids=self.tokens, finish_reason=self.finish or "length",
            mixture=self.request.mixture, prompt_tokens=len(self.prompt_ids), routing=self.request.routing,
            seconds_to_first_token=(self.first_token_at or now) - self.started, seconds=now - self.started,
            logprobs=self.logprobs,
        )


class Engine:
    """Generate for batches of requests, each with its own mixture of library adapters."""

    def __init__(self, base: "BaseModel", library: "Library | None" = None, *,
                 target_modules: tuple[str, ...] | None = None, fold: bool = True,
                 fused: FusedModel | None = None, compile: bool = False):
        """`fused`: an existing FusedModel over `base` to generate with (its loaded adapters included).
        `compile`: decode through the compiled step (`compiled.py`; the first step of each batch
        shape compiles, or loads the compiled code from Inductor's on-disk cache)."""
        self.base = base
        # Fold a mixture that the whole batch shares into a copy of the adapted weights for the
        # length of one generate call: every decode step then costs exactly a base step. On the
        # 2-core CPU the fold itself costs 0.11x of one 8x96-token forward (speed.json,
        # loramux_fold_only), about what leaving that forward unfolded costs. The price is one
        # extra copy of each adapted weight while the call runs; `fold=False` keeps memory flat.
        self.fold = fold
        self.library = library
        if fused is not None and fused.base is not base:
            raise LoramuxError("the fused model given to Engine must wrap the same base model")
        self.fused = fused or FusedModel(base, target_modules)
        self.formatter = PromptFormatter(base.tokenizer)
        self.stop_ids = set(self.formatter.stop_token_ids())
        self.max_context = getattr(base.model.config, "max_position_embeddings", None)
        self.compiled = None
        if compile:
            from .compiled import CompiledDecoder

            self.compiled = CompiledDecoder(self.fused)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return list(self.fused.adapters)

    def load(self, name: str) -> None:
        if self.library is None:
            raise LoramuxError("this engine has no library; create it with Engine(base, library)")
        self.fused.load(self.library, name)

    def ensure_loaded(self, names) -> None:
        """Load from the library each of `names` not loaded yet (without a library: nothing)."""
        for name in names:
            if name not in self.fused.adapters and self.library is not None:
                self.load(name)

    def unload(self, name: str) -> None:
        self.fused.remove_adapter(name)

    # ------------------------------------------------------------------ generation
    def route(self, requests: list[GenerationRequest], router: "Router") -> list[GenerationRequest]:
        """Route, in one batch, every request that has neither a mixture nor a routing."""
        todo = [i for i, r in enumerate(requests) if r.mixture is None and r.routing is None]
        if not todo:
            return list(requests)
        routings = router.route([requests[i].prompt for i in todo])
        out = list(requests)
        for i, routing in zip(todo, routings):
            # on first use: the chosen adapters, or the general one that serves an abstention
            self.ensure_loaded(routing.mixture or ())
            out[i] = dataclasses.replace(requests[i], routing=routing)
        return out

    def generate(self, requests: list[GenerationRequest], on_delta: DeltaCallback | None = None, *,
                 router: "Router | TokenRouter | None" = None) -> list[GenerationResult]:
        """Generate for all requests in one batch; `on_delta(i, text)` streams each row's new text.

        With a sentence-level `router` (DLP), each request without a mixture is routed on its own
        first and every row carries its own mixture through one fused batch. With a per-token
        router (Arrow) the fused layers weight adapters per token from their own inputs; each
        result's `routing` reports what its prompt's tokens used. Runs the server's scheduler
        synchronously: one decode loop for both. A bad request raises before any compute.
        """
        requests, token_router = self._routed(requests, router)
        scheduler, futures = self._scheduled(requests, token_router,
                                             lambda i: (lambda d: on_delta(i, d)) if on_delta else None)
        scheduler.run_until_idle()
        return [f.result() for f in futures]

    def stream(self, request: GenerationRequest, *, router: "Router | TokenRouter | None" = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as it is generated."""
        requests, token_router = self._routed([request], router)
        pieces: list[str] = []
        scheduler, [future] = self._scheduled(requests, token_router, lambda i: pieces.append)
        try:
            while not scheduler.idle():
                scheduler._guarded_step()
                yield from pieces
                pieces.clear()
            future.result()  # raises what ended the request
        finally:  # an abandoned stream: free the row (and the fused layers' cached factors)
            future.cancel()
            scheduler.run_until_idle()

    def _scheduled(self, requests: list[GenerationRequest], token_router, delta_for):
        from .scheduler import Scheduler

        rows, _ = self._prepare(requests)
        if token_router is not None:
            given = [i for i, r in enumerate(requests) if r.mixture is not None]
            if given:
                raise LoramuxError(f"requests {given} carry a mixture, but a per-token router "
                                   f"({token_router.kind}) routes every row of its batch; send them separately")
        scheduler = Scheduler(self, max_batch=len(requests), max_queue=len(requests), fold=self.fold)
        futures = [scheduler.submit(r, delta_for(i), router=token_router, prompt_ids=row.prompt_ids)
                   for i, (r, row) in enumerate(zip(requests, rows))]
        return scheduler, futures

    def _routed(self, requests: list[GenerationRequest], router) -> tuple[list[GenerationRequest], "TokenRouter | None"]:
        if router is None:
            return list(requests), None
        if getattr(router, "granularity", "sequence") in ("token", "layer"):
            # Arrow, MoLE: weights come from each layer's input, inside the forward
            return list(requests), router
        return self.route(requests, router), None

    def _row(self, req: GenerationRequest, i: int = 0, ids: list[int] | None = None) -> _Row:
        """Tokenize (unless `ids`, the prompt's tokens, are given) and check one request before any compute."""
        if ids is None:
            ids = (self.formatter.encode_prompt(req.prompt) if req.chat
                   else self.base.tokenizer(req.prompt)["input_ids"])
        if not ids:
            raise LoramuxError(f"request {i}: the prompt is empty")
        try:
            self.check_length(len(ids), req.sampling.max_new_tokens)
        except LoramuxError as e:
            raise LoramuxError(f"request {i}: {e}") from None
        return _Row(req, ids, set() if req.sampling.ignore_eos else self.stop_ids)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt and generation budget that do not fit the model's context."""
        if self.max_context and prompt_tokens + max_new_tokens > self.max_context:
            raise LoramuxError(f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the "
                               f"model's context of {self.max_context} tokens")

    def sequence_mixture(self, mixtures: list[dict[str, float] | None]) -> SequenceMixture | None:
        """One row per request (None: the base model); a mixture every row shares becomes one row."""
        if all(m is None for m in mixtures):
            return None
        if not self.fused.adapters:
            raise LoramuxError("a request names adapters but none are loaded; load them with Engine.load(name)")
        # A base-model row inside a mixed batch: weight 0 on any slot adds exactly nothing.
        neutral = {self.fused.adapters[0]: 0.0}
        rows = [m if m is not None else neutral for m in mixtures]
        if all(m == rows[0] for m in rows):  # one row serves all: it broadcasts over the batch
            rows = rows[:1]
        return self.fused.sequence_mixture(rows)

    def _prepare(self, requests: list[GenerationRequest]) -> tuple[list[_Row], SequenceMixture | None]:
        """Tokenize and check everything before any compute, so a bad request changes nothing."""
        if not requests:
            raise LoramuxError("no requests given")
        rows = [self._row(req, i) for i, req in enumerate(requests)]
        return rows, self.sequence_mixture([r.mixture for r in requests])
