"""Continuous batching: requests join the running batch between decode steps, each row with its
own mixture, and leave it as they finish. This is the only decode loop: the server runs it on a
thread, `Engine.generate` and `Engine.stream` run it synchronously.

One loop owns the model. Each iteration it (1) runs the model calls that wait (routing, prompt
log-probs), (2) admits waiting requests up to `max_batch`: their prompts are prefilled together,
and their KV cache joins the running one (both left-padded to a common length, the padding masked
out, positions explicit), (3) samples one token for every row, streams it and retires finished
rows, (4) runs one decode forward for the rest with a per-row `SequenceMixture`. A row's output
does not depend on its batch-mates: padding is masked and positions are its own (tested: greedy
output equals the request alone).

Faults stay with their request (vLLM's abort path; llama.cpp's per-slot errors): an exception
while sampling, stopping, detokenising or streaming one row ends that row alone; one in a prefill
fails only the rows being admitted (each is retried alone first, so a bad row cannot take its
admission-mates with it); one in a call fails that call. Only a failing decode forward, which no
row can be blamed for, fails the running batch. Every future is resolved on every path.

Requests for in-forward routers (Arrow, MoLE), whose gate serves a whole forward, run as a batch
of their own once the running one drains (`submit(..., router=...)`).

With an engine built with `compile=True`, a batch that starts without an in-forward router
decodes through the compiled step (`compiled.py`): prompts are prefilled as above, then each row
moves into a slot of its static cache, and (4) is one compiled call over the slots. Everything
else, admission, sampling, retirement and the fault paths, is this loop's either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LoramuxError
from ..fusion import SequenceMixture
from ..padding import length_groups
from ..training.batching import left_pad
from .engine import Engine, _Row
from .prefix_cache import PrefixCache
from .sampling import pick
from .request import GenerationRequest, GenerationResult

log = logging.getLogger("loramux.scheduler")


class QueueFull(LoramuxError):
    """The waiting queue is at its bound; the caller should retry later."""


class SchedulerStopped(LoramuxError):
    """The scheduler stopped before the request ran."""


@dataclass
class _Job:
    request: GenerationRequest | None  # None: a call (model work that is not generation)
    future: Future
    on_delta: Callable[[str], None] | None = None
    router: object | None = None  # an in-forward router: the job runs in a batch of its own
    call: Callable[[], object] | None = None
    prompt_ids: list[int] | None = None  # the prompt's tokens when the caller has them already
    tag: str = ""  # the caller's request id, for the log
    row: _Row | None = None  # set on admission
    hit: tuple = (0, None)  # (tokens, PrefixEntry): its prompt's cached start, looked up on admission
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _State:
    """The running batch: one entry per row, and the tensors that go with them."""

    jobs: list[_Job] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)
    cache: object | None = None
    mask: torch.Tensor | None = None  # (B, L)
    next_pos: torch.Tensor | None = None  # (B,)
    logits: torch.Tensor | None = None  # (B, V): each row's next-token distribution, to sample from
    pending: list[int] = field(default_factory=list)  # the tokens just sampled, fed by the next decode
    # The decode mixture, kept while the rows stay the same: fused layers cache their factors per
    # mixture object, so a new object every step would redo that work at every step.
    mix: object | None = None
    mix_stale: bool = True  # set whenever rows join or leave
    router: object | None = None  # the in-forward router of this batch (then nobody else joins)
    # A batch on the compiled path (`compiled.py`): its slots, which hold the KV cache and the
    # mixtures, and each row's slot number; None: this batch decodes eagerly with `cache`.
    static: object | None = None
    slots: list[int] = field(default_factory=list)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_caches(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor):
    """Concatenate two KV caches along the batch, left-padding the shorter in time (masked out)."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    # Build every new tensor before changing `a`: a failure half-way (out of memory) leaves the
    # running cache as it was.
    merged = [(torch.cat([_pad_left(la.keys, width, 2), _pad_left(lb.keys, width, 2)], dim=0),
               torch.cat([_pad_left(la.values, width, 2), _pad_left(lb.values, width, 2)], dim=0))
              for la, lb in zip(a.layers, b.layers)]
    mask = torch.cat([_pad_left(mask_a, width, 1), _pad_left(mask_b, width, 1)], dim=0)
    for layer, (keys, values) in zip(a.layers, merged):
        layer.keys, layer.values = keys, values
    return a, mask


def _shared(mix) -> bool:
    """One mixture row that every row of the batch shares (it broadcasts, and it can be folded)."""
    return isinstance(mix, SequenceMixture) and mix.indices.shape[0] == 1


def _resolve(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it is already done (a client may cancel at any moment)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64, fold: bool = False,
                 prefix_cache_tokens: int = 0):
        """`fold`: fold a mixture that every running row shares into the weights (Engine.fold).
        `prefix_cache_tokens`: hold the keys and values of up to this many recent prompt tokens, so
        that a prompt starting like a recent one prefills only the rest (`prefix_cache.py`); 0: off."""
        if max_batch < 1 or max_queue < 1 or prefix_cache_tokens < 0:
            raise LoramuxError(f"max_batch and max_queue must be positive and prefix_cache_tokens not negative; "
                               f"got {max_batch}, {max_queue}, {prefix_cache_tokens}")
        self.engine, self.max_batch, self.fold = engine, max_batch, fold
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.waiting: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.calls: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)  # run between steps
        self.state = _State()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stats = {"requests": 0, "finished": 0, "failed": 0, "tokens": 0, "steps": 0, "batch_rows": 0}
        self.observers: list[Callable[[str, dict], None]] = []  # metrics hooks: (event, data)

    # ------------------------------------------------------------------ public
    def call(self, fn: Callable[[], object], *, exclusive: bool = False) -> Future:
        """Run `fn` on the scheduler's thread, between two steps: model work that is not
        generation (routing a prompt, scoring its tokens). `exclusive`: only once the running batch
        has drained (loading or removing an adapter changes the slots the batch uses)."""
        return self._enqueue(_Job(None, Future(), call=fn), self.waiting if exclusive else self.calls)

    def submit(self, request: GenerationRequest, on_delta: Callable[[str], None] | None = None, *,
               router=None, prompt_ids: list[int] | None = None, tag: str = "") -> Future:
        """Queue a request; the Future gets its GenerationResult (or the error that ended it).
        Cancelling the Future (a client that left, a timeout) frees its row at the next step.
        `prompt_ids`: the prompt's tokens, when the caller has tokenized it already."""
        future = self._enqueue(_Job(request, Future(), on_delta, router, None, prompt_ids, tag), self.waiting)
        self.stats["requests"] += 1
        return future

    def _enqueue(self, job: _Job, target: queue.Queue) -> Future:
        if self._stop.is_set():
            raise SchedulerStopped("the server is shutting down")
        try:
            target.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({target.maxsize} waiting); retry later") from None
        self._wake.set()
        return job.future

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def running(self) -> int:
        return len(self.state.rows)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="loramux-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)
        stopped = SchedulerStopped("the server is shutting down")
        if thread is None:  # synchronous use; a thread ends its own batch as it exits (_loop)
            self._drop_batch(stopped)
        for q in (self.waiting, self.calls):
            while not q.empty():
                _resolve(q.get_nowait().future, error=stopped)

    def idle(self) -> bool:
        return self.waiting.empty() and self.calls.empty() and not self.state.rows

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (synchronous use without the thread)."""
        while not self.idle():
            self._guarded_step()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.idle():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._guarded_step()
            except Exception:  # even ending a batch failed: keep the thread, start from an empty batch
                log.exception("the scheduler loop recovered from an error")
                self.state = _State()
        self._drop_batch(SchedulerStopped("the server is shutting down"))

    def _guarded_step(self) -> None:
        try:
            self.step()
        except Exception as e:  # a decode forward failed: no row can be blamed, so the batch ends
            log.exception("decode step failed; ending the %d running request(s)", len(self.state.jobs))
            self._drop_batch(e)

    def _drop_batch(self, error: BaseException) -> None:
        for job in self._end_batch():
            self._fail(job, error, logged=True)

    def _end_batch(self) -> list[_Job]:
        """Forget the running batch and free what its forwards cached; returns its jobs."""
        jobs, router = self.state.jobs, self.state.router
        self.state = _State()  # a compiled batch's slots go with it
        self._release(router)
        return jobs

    def _release(self, router) -> None:
        self.engine.fused.release()  # cached factors and folded weights (up to a copy per slot used)
        if router is not None and hasattr(router, "release"):
            router.release()  # routers that hold per-batch state (MoLE)

    @torch.no_grad()
    def step(self) -> None:
        self._run_calls()
        self._admit()
        if self.state.rows:
            self._sample_and_retire()
        if self.state.rows:
            self._decode()

    def _run_calls(self) -> None:
        while not self.calls.empty():
            self._run_call(self.calls.get_nowait())

    def _run_call(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        try:
            _resolve(job.future, job.call())
        except Exception as e:  # the caller decides what the error means; it ends this call only
            _resolve(job.future, error=e)

    def _fail(self, job: _Job, error: BaseException, logged: bool = False) -> None:
        if not isinstance(error, LoramuxError) and not logged:
            log.error("request %s failed", job.tag or "?", exc_info=error)
        self.stats["failed"] += 1
        self._notify("failed", {"request": job.request, "error": error})
        _resolve(job.future, error=error)

    def _admit(self) -> None:
        st = self.state
        if st.router is not None:  # an in-forward router's batch runs alone until it drains
            return
        new: list[_Job] = []
        while len(st.rows) + len(new) < self.max_batch and not self.waiting.empty():
            job = self.waiting.get_nowait()
            if job.future.cancelled():  # left while waiting
                self._notify("cancelled", {"request": job.request})
                continue
            if job.call is not None or job.router is not None:
                if st.rows or new:  # its own batch, once the running one drains: keep its place
                    self.waiting.queue.appendleft(job)
                    break
                if job.call is not None:
                    self._run_call(job)
                    continue
                self._admit_router(job)
                return
            try:
                job.row = self.engine._row(job.request, ids=job.prompt_ids)
                self.engine.sequence_mixture([job.request.mixture])  # names loaded, weights finite
            except Exception as e:
                self._fail(job, e)
                continue
            new.append(job)
        # Engine.generate folds a shared mixture: one prefill folds once (the server never folds)
        for job in new:
            job.hit = self._lookup(job)
        # grouped by what is left to prefill: a row whose start is cached joins rows of its remaining length
        left = [len(j.row.prompt_ids) - j.hit[0] for j in new]
        groups = [list(range(len(new)))] if self.fold and new else length_groups(left)
        try:
            for group in groups:
                self._prefill_isolated([new[i] for i in group])
        except Exception as e:  # not a prefill's fault (those are isolated): no taken job is left open
            for job in new:
                if job not in self.state.jobs:
                    self._fail(job, e)

    def _admit_router(self, first: _Job) -> None:
        """Start a batch of the waiting jobs for `first`'s in-forward router (the same router object)."""
        jobs = [first]
        while len(jobs) < self.max_batch and not self.waiting.empty() and self.waiting.queue[0].router is first.router:
            jobs.append(self.waiting.get_nowait())
        ok = []
        for job in jobs:
            try:
                if job.request.mixture is not None:
                    raise LoramuxError(f"a request for the per-token router {first.router.kind} carries a mixture; "
                                       f"the router sets every row's weights")
                job.row = self.engine._row(job.request, ids=job.prompt_ids)
            except Exception as e:
                self._fail(job, e)
                continue
            ok.append(job)
        if not ok:
            return
        try:
            self._prefill(ok, router=first.router)
        except Exception as e:
            log.exception("prefill for router %s failed", getattr(first.router, "kind", "?"))
            for job in ok:
                self._fail(job, e, logged=True)
            self._release(first.router)

    def _prefill_isolated(self, jobs: list[_Job]) -> None:
        try:
            self._prefill(jobs)
        except Exception as e:
            self.engine.fused.release()
            if any(j.hit[0] for j in jobs):  # a reused start may be at fault: once more, prompts whole
                for job in jobs:
                    job.hit = (0, None)
                self._prefill_isolated(jobs)
                return
            if len(jobs) > 1:  # find the row at fault: each alone, so the others still run
                for job in jobs:
                    self._prefill_isolated([job])
                return
            if not isinstance(e, LoramuxError):
                log.exception("prefill of request %s failed", jobs[0].tag or "?")
            self._fail(jobs[0], e, logged=True)

    def _prefill(self, jobs: list[_Job], router=None) -> None:
        """Run the prompts of newly admitted rows and append them to the running batch. Nothing
        of the running batch changes until the forward has succeeded."""
        model, tok = self.engine.base.model, self.engine.base.tokenizer
        device = next(model.parameters()).device
        rows = [j.row for j in jobs]
        cached = router is None and self.prefix_cache is not None
        keys = [self._prefix_key(j.request.mixture) for j in jobs] if cached else None
        hits, past = ([j.hit for j in jobs] if cached else []), None
        try:  # the cache is best-effort: whatever goes wrong in it, the prompts are prefilled whole
            if any(n for n, _ in hits):
                ids, mask, past = self._after_prefixes(rows, hits, device)
        except Exception:
            log.exception("prefix cache: reusing a start failed; cleared, prefilling whole prompts")
            self.prefix_cache.clear()
            hits, past = [], None
        if past is None:
            hits = []
            ids, mask = left_pad([r.prompt_ids for r in rows], tok.pad_token_id, device=device)
        st, compiled = self.state, self.engine.compiled
        static = st.static is not None or (not st.rows and router is None and compiled is not None
                                           and compiled.usable())
        if router is not None:
            mix, fold = router.layer_mixture(), False
        else:
            mix = self.engine.sequence_mixture([j.request.mixture for j in jobs])
            fold = self.fold and _shared(mix) and not static  # the compiled decode never uses a fold
        with contextlib.ExitStack() as stack:
            recorder = stack.enter_context(router.recording(mask)) if router is not None else None
            stack.enter_context(self.engine.fused.mixture(mix, attention_mask=mask, fold=fold))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=past, use_cache=True,
                        logits_to_keep=1)
        if keys:
            try:
                self._keep_prefixes(keys, rows, out.cache, mask)
            except Exception:  # not the rows' fault: they go on, the cache starts over
                log.exception("prefix cache store failed; cleared")
                self.prefix_cache.clear()
        if recorder is not None:  # what each row's prompt tokens used, for its result
            for row, routing in zip(rows, router.routings(recorder)):
                row.request = dataclasses.replace(row.request, routing=routing)
        joining = bool(st.rows)
        if static:  # the compiled path takes the rows: their cache and mixtures move into slots
            slots = st.static if st.static is not None else compiled.slots()
            taken = slots.admit(out.cache, mask, [j.request.mixture for j in jobs])
            if not joining:
                st.static, st.mix, st.mix_stale = slots, None, False
            st.slots += taken
        elif joining:
            st.cache, st.mask = merge_caches(st.cache, st.mask, out.cache, mask)
            st.next_pos = torch.cat([st.next_pos, mask.sum(-1)])
            st.mix_stale = True
        else:
            st.cache, st.mask, st.next_pos = out.cache, mask, mask.sum(-1)
            st.mix, st.mix_stale, st.router = mix, False, router  # keep the prefill's mixture (and its fold)
        st.logits = torch.cat([st.logits, out.logits[:, -1]]) if joining else out.logits[:, -1]  # once the rows are in
        st.rows += rows
        st.jobs += jobs
        reused = [n for n, _ in hits] or [0] * len(jobs)
        for job, row, n in zip(jobs, rows, reused):
            self._notify("admitted", {"wait_s": time.perf_counter() - job.enqueued, "request": job.request, "row": row,
                                      "prefix_tokens_reused": n})

    def _lookup(self, job: _Job) -> tuple:
        """The job's longest cached prompt start (tokens, entry), or (0, None); best-effort."""
        if self.prefix_cache is None:
            return 0, None
        try:
            return self.prefix_cache.lookup(self._prefix_key(job.request.mixture), job.row.prompt_ids)
        except Exception:
            log.exception("prefix cache lookup failed; cleared")
            self.prefix_cache.clear()
            return 0, None

    def _prefix_key(self, mixture: dict[str, float] | None) -> tuple:
        """What a prompt's keys and values depend on besides its tokens: the base alone, or the
        mixture over the adapters as loaded now (a reload bumps the version)."""
        if not mixture:
            return ("base",)
        return (self.engine.fused.version, tuple(sorted(mixture.items())))

    def _after_prefixes(self, rows: list[_Row], hits: list, device) -> tuple:
        """Inputs for prefilling only what follows each row's cached start: the rows' cached keys
        and values as a past cache (left-padded to the longest), then the rest of each prompt
        (left-padded too); one mask over both, so a row's tokens are [pad, start, pad, rest]
        and its positions count only its own."""
        from transformers import DynamicCache

        tok = self.engine.base.tokenizer
        ids, rest_mask = left_pad([r.prompt_ids[n:] for r, (n, _) in zip(rows, hits)], tok.pad_token_id, device=device)
        H = max(n for n, _ in hits)
        start_mask = torch.zeros(len(rows), H, dtype=rest_mask.dtype, device=device)
        layers = []
        some = next(e for _, e in hits if e is not None)
        for i in range(len(some.keys)):
            n_kv, _, D = some.keys[i].shape
            k = some.keys[i].new_zeros(len(rows), n_kv, H, D)
            v = torch.zeros_like(k)
            for b, (n, entry) in enumerate(hits):
                if n:
                    k[b, :, H - n:] = entry.keys[i][:, :n]
                    v[b, :, H - n:] = entry.values[i][:, :n]
            layers.append((k, v))
        for b, (n, _) in enumerate(hits):
            start_mask[b, H - n:] = 1
        return ids, torch.cat([start_mask, rest_mask], dim=1), DynamicCache(layers)

    def _keep_prefixes(self, keys: list[tuple], rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Hold each row's prompt keys and values (copies: the running cache moves on), copied
        only for prompts the cache takes."""
        from transformers.cache_utils import DynamicLayer

        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return  # sliding-window layers keep only their window: a start may be gone
        for b, (key, row) in enumerate(zip(keys, rows)):
            if not self.prefix_cache.wants(key, row.prompt_ids):
                continue
            where = mask[b].nonzero().squeeze(-1)
            self.prefix_cache.store(key, row.prompt_ids, [layer.keys[b][:, where] for layer in cache.layers],
                                    [layer.values[b][:, where] for layer in cache.layers])

    def _sample_and_retire(self) -> None:
        st, tok = self.state, self.engine.base.tokenizer
        keep, tokens = [], []
        picks = self._picks()
        for b, (row, job) in enumerate(zip(st.rows, st.jobs)):
            if job.future.cancelled():  # the client went away or timed out: free its row now
                self._notify("cancelled", {"request": job.request})
                continue
            try:
                if isinstance(picks[b], BaseException):
                    raise picks[b]
                token, delta = row.take(picks[b], tok)
                self.stats["tokens"] += 1
                if delta and job.on_delta is not None:
                    job.on_delta(delta)
                if row.finish is None:
                    keep.append(b)
                    tokens.append(token)
                    continue
                result = row.result()
            except Exception as e:  # this row's sampling, stop strings, detokenising or stream
                self._fail(job, e)
                continue
            self.stats["finished"] += 1
            self._notify("finished", {"result": result, "request": job.request})
            _resolve(job.future, result)
        if len(keep) < len(st.rows):
            if not keep:
                self._end_batch()
                return
            if st.static is not None:
                kept = set(keep)
                st.static.free([s for b, s in enumerate(st.slots) if b not in kept])
                st.slots = [st.slots[b] for b in keep]
            else:
                index = torch.tensor(keep, device=st.mask.device)
                st.cache.batch_select_indices(index)
                st.mask, st.next_pos = st.mask[index], st.next_pos[index]
            st.rows = [st.rows[b] for b in keep]
            st.jobs = [st.jobs[b] for b in keep]
            if st.router is not None:
                if hasattr(st.router, "select_rows"):
                    st.router.select_rows(keep)  # routers that hold per-row state (MoLE)
            elif not _shared(st.mix):
                st.mix_stale = True  # one shared row broadcasts over any batch: it stays (with its fold)
        st.pending = tokens

    def _picks(self) -> list:
        """Every row's next token in one batched pick (one host transfer); if that fails, row by row,
        so that only the row at fault gets its exception (in place of its pick)."""
        st = self.state
        try:
            return pick(st.logits, [row.wants(st.logits.device) for row in st.rows])
        except Exception:
            out = []
            for b, row in enumerate(st.rows):
                try:
                    out += pick(st.logits[b:b + 1], [row.wants(st.logits.device)])
                except Exception as e:
                    out.append(e)
            return out

    def _decode(self) -> None:
        st = self.state
        if st.static is not None:
            st.logits = st.static.step(st.slots, st.pending)
            self._stepped()
            return
        model = self.engine.base.model
        device = st.mask.device
        st.mask = torch.cat([st.mask, st.mask.new_ones(len(st.rows), 1)], dim=-1)
        if st.mix_stale:
            self.engine.fused.release()  # the previous rows' cached factors
            st.mix, st.mix_stale = self.engine.sequence_mixture([j.request.mixture for j in st.jobs]), False
        fold = self.fold and _shared(st.mix)
        with self.engine.fused.mixture(st.mix, fold=fold):
            out = model(input_ids=torch.tensor(st.pending, device=device)[:, None], attention_mask=st.mask,
                        position_ids=st.next_pos[:, None], cache=st.cache, use_cache=True)
        st.cache, st.logits = out.cache, out.logits[:, -1]
        st.next_pos = st.next_pos + 1
        self._stepped()

    def _stepped(self) -> None:
        st = self.state
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(st.rows)
        self._notify("step", {"rows": len(st.rows)})

    def _notify(self, event: str, data: dict) -> None:
        for observer in self.observers:
            try:
                observer(event, data)
            except Exception:  # a metrics hook must not end requests
                log.exception("scheduler observer failed on %r", event)


def generate_all(scheduler: Scheduler, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submit and wait (synchronous helper)."""
    futures = [scheduler.submit(r) for r in requests]
    if scheduler._thread is None:
        scheduler.run_until_idle()
    return [f.result() for f in futures]
