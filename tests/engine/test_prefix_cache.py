"""Reused prompt starts (engine/prefix_cache.py) through the scheduler, eager and compiled."""

import pytest
import torch

from loramux.engine.compiled import CompiledDecoder
from loramux.engine.prefix_cache import PrefixCache
from loramux.engine.scheduler import Scheduler

from .test_engine import engine, greedy, lib  # noqa: F401 (fixtures)

START = "Answer the question below in one word, and say nothing else at all. Question: "
PROMPTS = [START + q for q in ("what colour is the sky", "how many legs has a spider", "who wrote Hamlet then",
                               "x")]
MIXES = [None, {"a": 1.0}, {"b": 0.7, "c": 0.3}, None]


def kv(n, fill=0.0):
    return [torch.full((1, n, 2), fill)], [torch.full((1, n, 2), fill)]


def test_lookup_takes_the_longest_start_under_the_same_key_and_never_the_last_token():
    cache = PrefixCache(max_tokens=100, min_tokens=2)
    cache.store(("base",), [1, 2, 3, 4], *kv(4, 1.0))
    cache.store(("base",), [1, 2, 9], *kv(3, 2.0))
    cache.store(("other",), [1, 2, 3, 4, 5], *kv(5))
    n, entry = cache.lookup(("base",), [1, 2, 3, 4, 5, 6])
    assert n == 4 and entry.ids == (1, 2, 3, 4)
    n, entry = cache.lookup(("base",), [1, 2, 3, 4])  # the whole prompt is cached: its last token is not reused
    assert n == 3
    assert cache.lookup(("base",), [1, 7, 7]) == (0, None)  # a 1-token match is under min_tokens
    assert cache.lookup(("nobody",), [1, 2, 3, 4]) == (0, None)
    assert cache.stats["hits"] == 2 and cache.stats["tokens_reused"] == 7


def test_a_longer_prompt_replaces_its_start_and_the_oldest_go_first():
    cache = PrefixCache(max_tokens=10, min_tokens=2)
    cache.store(("base",), [1, 2, 3], *kv(3))
    cache.store(("base",), [1, 2, 3, 4, 5], *kv(5))  # covers [1, 2, 3]
    assert len(cache) == 1 and cache.tokens == 5
    cache.store(("base",), [7, 8, 9], *kv(3))
    cache.lookup(("base",), [1, 2, 3, 4, 5, 6])  # [1..5] is now the most recently used
    cache.store(("base",), [4, 4, 4, 4], *kv(4))  # 12 tokens > 10: [7, 8, 9] goes
    assert cache.tokens == 9 and cache.lookup(("base",), [7, 8, 9, 1]) == (0, None)
    cache.store(("base",), list(range(11)), *kv(11))  # longer than the whole budget: not held
    assert cache.tokens == 9


def run(engine, requests, prefix_cache_tokens, *, together=False):
    """Each request after the one before (so later ones can reuse earlier starts), or all at once."""
    sched = Scheduler(engine, max_batch=8, prefix_cache_tokens=prefix_cache_tokens)
    if together:
        futures = [sched.submit(r) for r in requests]
        sched.run_until_idle()
        return [f.result().token_ids for f in futures], sched
    out = []
    for r in requests:
        future = sched.submit(r)
        sched.run_until_idle()
        out.append(future.result().token_ids)
    return out, sched


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_reused_starts_give_the_tokens_of_a_full_prefill(where, engine, path):
    """Greedy tokens with reused starts (later prompts reusing earlier ones' starts, then a batch
    admitted together, every row with a hit) equal those of prompts prefilled whole; only
    same-mixture starts are reused."""
    if where.dtype != "float32":
        pytest.skip("token-for-token equality is an fp32 claim")
    if path == "compiled":
        engine.compiled = CompiledDecoder(engine.fused, backend="eager")
    requests = [greedy(p, m, n=6) for p, m in zip(PROMPTS, MIXES)]
    reference, _ = run(engine, requests, 0)
    got, sched = run(engine, requests, 4096)
    assert got == reference
    cache = sched.prefix_cache
    assert cache.stats["hits"] == 1  # the last prompt shares its start with the first (both base)
    # a second round: every prompt has its whole self cached (under its own mixture), admitted together
    again = requests + [greedy(START + "and the sea", {"a": 1.0}, n=6)]
    together, _ = run(engine, again, 0, together=True)
    cache.stats["hits"] = 0
    futures = [sched.submit(r) for r in again]
    sched.run_until_idle()
    sched_got = [f.result().token_ids for f in futures]
    assert sched_got == together
    assert cache.stats["hits"] == len(again)


def test_a_reloaded_adapter_does_not_reuse_its_old_keys(engine):
    requests = [greedy(PROMPTS[0], {"a": 1.0}, n=4), greedy(PROMPTS[1], {"a": 1.0}, n=4)]
    _, sched = run(engine, requests, 4096)
    assert sched.prefix_cache.stats["hits"] == 1
    engine.unload("a")
    engine.load("a")
    sched.submit(requests[1])
    sched.run_until_idle()
    assert sched.prefix_cache.stats["hits"] == 1


def test_a_reused_start_gives_the_logits_of_a_full_prefill(where, engine):
    """After the prefill and one decode step (eager path), the logits equal those without reuse."""
    def first_logits(tokens, earlier):
        sched = Scheduler(engine, max_batch=8, prefix_cache_tokens=tokens)
        for prompt in earlier:
            sched.submit(greedy(prompt, {"b": 0.7, "c": 0.3}, n=2))
            sched.run_until_idle()
        sched.submit(greedy(PROMPTS[3], {"b": 0.7, "c": 0.3}, n=3))
        sched.step()
        return sched.state.logits.float(), sched.prefix_cache

    whole, _ = first_logits(0, [])
    reused, cache = first_logits(4096, [PROMPTS[0]])
    assert cache.stats["tokens_reused"] > 10
    tol = where.tol(1e-5)
    torch.testing.assert_close(reused, whole, atol=tol, rtol=tol)


def test_a_failing_cache_ends_no_request(engine, monkeypatch):
    """The cache is best-effort: a lookup or a store that raises leaves the requests to a whole prefill."""
    requests = [greedy(PROMPTS[0], None, n=4), greedy(PROMPTS[3], None, n=4)]
    reference, _ = run(engine, requests, 0)
    sched = Scheduler(engine, max_batch=8, prefix_cache_tokens=4096)

    def boom(*a, **k):
        raise RuntimeError("cache broke")

    for method in ("store", "lookup"):
        with monkeypatch.context() as m:
            m.setattr(sched.prefix_cache, method, boom)
            futures = [sched.submit(r) for r in requests]
            sched.run_until_idle()
        assert [f.result().token_ids for f in futures] == reference


def test_rows_are_grouped_by_what_is_left_to_prefill(engine):
    """A long prompt whose start is cached and a long one without a hit, admitted together, prefill
    apart: the first computes only its short rest, not padded to the other's whole length."""
    sched = Scheduler(engine, max_batch=8, prefix_cache_tokens=4096)
    long_start = START * 3
    sched.submit(greedy(long_start + "first", None, n=2))
    sched.run_until_idle()
    widths = []
    forward = engine.base.model.forward

    def recording(*a, **k):
        widths.append(k["input_ids"].shape[1])
        return forward(*a, **k)

    other = "Something else entirely, said at length. " * 8
    engine.base.model.forward = recording
    try:
        sched.submit(greedy(long_start + "second", None, n=2))
        sched.submit(greedy(other, None, n=2))
        sched.run_until_idle()
    finally:
        del engine.base.model.forward
    prefills = sorted(w for w in widths if w > 1)
    assert sched.prefix_cache.stats["hits"] == 1
    assert len(prefills) == 2 and prefills[0] < 32 and prefills[1] == len(engine._row(greedy(other)).prompt_ids)
