"""Continuous batching: requests join the running batch between decode steps, each row with its
own mixture, and leave it as they finish.

One loop owns the model. Each iteration it (1) admits waiting requests up to `max_batch`: their
prompts are prefilled together, and their KV cache joins the running one (both left-padded to a
common length, the padding masked out, positions explicit), (2) samples one token for every row,
streams it and retires finished rows, (3) runs one decode forward for the rest with a per-row
`SequenceMixture`. A row's output does not depend on its batch-mates: padding is masked and
positions are its own (tested: greedy output equals the request alone).

Requests for in-forward routers (Arrow, MoLE), whose gate serves a whole forward, run as their
own batch between iterations (`submit(..., router=...)`).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LoramuxError
from ..padding import length_groups
from ..training.batching import left_pad
from .engine import Engine, _Row
from .request import GenerationRequest, GenerationResult


class QueueFull(LoramuxError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class _Job:
    request: GenerationRequest
    future: Future
    on_delta: Callable[[str], None] | None = None
    router: object | None = None  # an in-forward router: the job runs as its own batch
    prompt_ids: list[int] | None = None  # the prompt's tokens when the caller has them already
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
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_pad_left(la.keys, width, 2), _pad_left(lb.keys, width, 2)], dim=0)
        la.values = torch.cat([_pad_left(la.values, width, 2), _pad_left(lb.values, width, 2)], dim=0)
    return a, torch.cat([_pad_left(mask_a, width, 1), _pad_left(mask_b, width, 1)], dim=0)


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise LoramuxError(f"max_batch and max_queue must be positive; got {max_batch}, {max_queue}")
        self.engine, self.max_batch = engine, max_batch
        self.waiting: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.state = _State()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stats = {"requests": 0, "finished": 0, "tokens": 0, "steps": 0, "batch_rows": 0}
        self.observers: list[Callable[[str, dict], None]] = []  # metrics hooks: (event, data)

    # ------------------------------------------------------------------ public
    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the scheduler's thread, alone (once the running batch drains): model work
        that is not generation, e.g. scoring a prompt's own tokens."""
        return self.submit(None, router=fn)

    def submit(self, request: GenerationRequest | None, on_delta: Callable[[str], None] | None = None, *,
               router=None, prompt_ids: list[int] | None = None) -> Future:
        """Queue a request; the Future gets its GenerationResult (or the error that refused it).
        Cancelling the Future (a client that left, a timeout) frees its row at the next step.
        `prompt_ids`: the prompt's tokens, when the caller has tokenized it already."""
        job = _Job(request, Future(), on_delta, router, prompt_ids)
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.waiting.maxsize} waiting); retry later") from None
        self.stats["requests"] += 1
        self._wake.set()
        return job.future

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def running(self) -> int:
        return len(self.state.rows)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="loramux-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (tests, and synchronous use without the thread)."""
        while not self.waiting.empty() or self.state.rows:
            self.step()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.waiting.empty() and not self.state.rows:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a bug must not kill the server: fail the rows in flight
                for job in self.state.jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                self.state = _State()

    @torch.no_grad()
    def step(self) -> None:
        self._admit()
        if self.state.rows:
            self._sample_and_retire()
        if self.state.rows:
            self._decode()

    def _admit(self) -> None:
        new: list[_Job] = []
        while len(self.state.rows) + len(new) < self.max_batch and not self.waiting.empty():
            job = self.waiting.get_nowait()
            if job.router is not None:  # in-forward router: its own batch, once the running one drains
                if self.state.rows or new:
                    self.waiting.queue.appendleft(job)  # keep its place: admitted once the batch drains
                    break
                self._run_alone(job)
                continue
            new.append(job)
        rows, jobs = [], []
        for job in new:
            if job.future.cancelled():  # left while waiting
                self._notify("cancelled", {"request": job.request})
                continue
            try:
                row = self.engine._row(job.request, ids=job.prompt_ids)
                self.engine.sequence_mixture([job.request.mixture])  # names loaded, weights finite
            except LoramuxError as e:
                self._notify("refused", {"request": job.request, "error": str(e)})
                job.future.set_exception(e)
                continue
            rows.append(row)
            jobs.append(job)
        for group in length_groups([len(r.prompt_ids) for r in rows]):
            self._prefill([rows[i] for i in group], [jobs[i] for i in group])

    def _prefill(self, rows: list[_Row], jobs: list[_Job]) -> None:
        """Run the prompts of newly admitted rows and append them to the running batch."""
        model, tok = self.engine.base.model, self.engine.base.tokenizer
        device = next(model.parameters()).device
        ids, mask = left_pad([r.prompt_ids for r in rows], tok.pad_token_id, device=device)
        mix = self.engine.sequence_mixture([j.request.mixture for j in jobs])
        with self.engine.fused.mixture(mix):
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
        self.engine.fused.release()
        st = self.state
        if st.rows:
            st.cache, st.mask = merge_caches(st.cache, st.mask, out.past_key_values, mask)
            st.next_pos = torch.cat([st.next_pos, mask.sum(-1)])
            st.logits = torch.cat([st.logits, out.logits[:, -1]])
        else:
            st.cache, st.mask, st.next_pos, st.logits = out.past_key_values, mask, mask.sum(-1), out.logits[:, -1]
        st.rows += rows
        st.jobs += jobs
        st.mix_stale = True
        for job, row in zip(jobs, rows):
            self._notify("admitted", {"wait_s": time.perf_counter() - job.enqueued, "request": job.request, "row": row})

    def _sample_and_retire(self) -> None:
        st, tok = self.state, self.engine.base.tokenizer
        keep, tokens = [], []
        for b, (row, job) in enumerate(zip(st.rows, st.jobs)):
            if job.future.cancelled():  # the client went away or timed out: free its row now
                self._notify("cancelled", {"request": job.request})
                continue
            token, delta = row.sample(st.logits[b], tok)
            self.stats["tokens"] += 1
            if delta and job.on_delta is not None:
                job.on_delta(delta)
            if row.finish is None:
                keep.append(b)
                tokens.append(token)
            else:
                result = row.result()
                self.stats["finished"] += 1
                self._notify("finished", {"result": result, "request": job.request})
                job.future.set_result(result)
        if len(keep) < len(st.rows):
            if not keep:
                self.state = _State()
                self.engine.fused.release()  # the drained batch's cached factors (up to a copy per slot used)
                return
            index = torch.tensor(keep, device=st.mask.device)
            st.cache.batch_select_indices(index)
            st.mask, st.next_pos = st.mask[index], st.next_pos[index]
            st.rows = [st.rows[b] for b in keep]
            st.jobs = [st.jobs[b] for b in keep]
            st.mix_stale = True
        st.pending = tokens

    def _decode(self) -> None:
        st = self.state
        model = self.engine.base.model
        device = st.mask.device
        st.mask = torch.cat([st.mask, st.mask.new_ones(len(st.rows), 1)], dim=-1)
        if st.mix_stale:
            self.engine.fused.release()  # the previous rows' cached factors
            st.mix, st.mix_stale = self.engine.sequence_mixture([j.request.mixture for j in st.jobs]), False
        with self.engine.fused.mixture(st.mix):
            out = model(input_ids=torch.tensor(st.pending, device=device)[:, None], attention_mask=st.mask,
                        position_ids=st.next_pos[:, None], past_key_values=st.cache, use_cache=True)
        st.cache, st.logits = out.past_key_values, out.logits[:, -1]
        st.next_pos = st.next_pos + 1
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(st.rows)
        self._notify("step", {"rows": len(st.rows)})

    def _run_alone(self, job: _Job) -> None:
        if job.request is None:  # a call(): exclusive model work
            try:
                job.future.set_result(job.router())
            except Exception as e:
                job.future.set_exception(e)
            return
        try:
            [result] = self.engine.generate([job.request], (lambda i, d: job.on_delta(d)) if job.on_delta else None,
                                            router=job.router)
        except LoramuxError as e:
            job.future.set_exception(e)
            return
        self.stats["finished"] += 1
        self._notify("finished", {"result": result, "request": job.request})
        job.future.set_result(result)

    def _notify(self, event: str, data: dict) -> None:
        for observer in self.observers:
            observer(event, data)


def generate_all(scheduler: Scheduler, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submit and wait (synchronous helper)."""
    futures = [scheduler.submit(r) for r in requests]
    if scheduler._thread is None:
        scheduler.run_until_idle()
    return [f.result() for f in futures]
