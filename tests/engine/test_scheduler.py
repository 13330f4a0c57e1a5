import pytest
import torch

from loramux.engine.scheduler import QueueFull, Scheduler, generate_all, merge_caches
from loramux.errors import LoramuxError

from .test_engine import PROMPTS, engine, greedy, lib  # noqa: F401 (fixtures)

MIXES = [{"a": 1.0}, {"b": 0.7, "c": 0.3}, None, {"c": 1.0}, {"a": 0.5, "b": -0.5}]


def alone(engine, prompt, mixture, n):
    return engine.generate([greedy(prompt, mixture, n=n)])[0].token_ids


def test_rows_joining_mid_flight_match_each_request_alone(engine):
    sched = Scheduler(engine, max_batch=8)
    requests = [greedy(PROMPTS[i % 3], MIXES[i], n=4 + 2 * i) for i in range(5)]
    first = [sched.submit(r) for r in requests[:2]]
    sched.step()
    sched.step()  # the first two are decoding...
    later = [sched.submit(r) for r in requests[2:]]  # ...when three more join
    sched.run_until_idle()
    for req, fut in zip(requests, first + later):
        assert fut.result().token_ids == alone(engine, req.prompt, req.mixture, req.sampling.max_new_tokens)
        assert fut.result().mixture == req.mixture


def test_max_batch_and_streaming(engine):
    sched = Scheduler(engine, max_batch=2)
    pieces = {i: [] for i in range(4)}
    futures = [sched.submit(greedy(PROMPTS[i % 3], MIXES[i], n=5), on_delta=pieces[i].append) for i in range(4)]
    sched.step()
    assert sched.running == 2 and sched.queue_depth == 2  # the rest wait for a free row
    sched.run_until_idle()
    for i, f in enumerate(futures):
        assert "".join(pieces[i]) == f.result().text


def test_bad_request_fails_alone_and_the_queue_is_bounded(engine):
    sched = Scheduler(engine, max_batch=4, max_queue=3)
    good = sched.submit(greedy("one two", {"a": 1.0}, n=3))
    bad = sched.submit(greedy("one two", {"nope": 1.0}, n=3))
    sched.submit(greedy("x", None, n=2))
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(greedy("y", None, n=2))
    sched.run_until_idle()
    assert len(good.result().token_ids) == 3
    with pytest.raises(LoramuxError, match="not loaded"):
        bad.result()


def test_in_forward_router_jobs_run_as_their_own_batch(engine, lib):
    from loramux.routers.arrow import ArrowConfig, ArrowRouter

    router = ArrowRouter(engine.fused, lib, ArrowConfig(top_k=2))
    sched = Scheduler(engine)
    plain = sched.submit(greedy("one two", {"a": 1.0}, n=4))
    routed = sched.submit(greedy("The quick brown fox", None, n=4), router=router)
    sched.run_until_idle()
    expected = engine.generate([greedy("The quick brown fox", None, n=4)], router=router)[0]
    assert routed.result().token_ids == expected.token_ids and routed.result().routing.router == "arrow"
    assert plain.result().token_ids == alone(engine, "one two", {"a": 1.0}, 4)


def test_background_thread(engine):
    sched = Scheduler(engine)
    sched.start()
    try:
        results = generate_all(sched, [greedy(p, m, n=3) for p, m in zip(PROMPTS, MIXES)])
    finally:
        sched.stop()
    assert [r.token_ids for r in results] == [alone(engine, p, m, 3) for p, m in zip(PROMPTS, MIXES)]


def test_merge_caches_pads_the_shorter_on_the_left():
    from transformers import DynamicCache

    a, b = DynamicCache(), DynamicCache()
    a.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    b.update(torch.full((2, 2, 5, 4), 2.0), torch.full((2, 2, 5, 4), 2.0), 0)
    cache, mask = merge_caches(a, torch.ones(1, 3, dtype=torch.long), b, torch.ones(2, 5, dtype=torch.long))
    assert cache.layers[0].keys.shape == (3, 2, 5, 4) and mask.tolist()[0] == [0, 0, 1, 1, 1]
    assert float(cache.layers[0].keys[0, :, :2].abs().sum()) == 0.0


def test_a_cancelled_request_frees_its_row(engine):
    sched = Scheduler(engine, max_batch=2)
    long = sched.submit(greedy("one two", {"a": 1.0}, n=30, ignore_eos=True))
    other = sched.submit(greedy("x", {"b": 1.0}, n=3))
    sched.step()
    assert sched.running == 2
    long.cancel()
    sched.step()
    assert sched.running <= 1 and long.cancelled()
    sched.run_until_idle()
    assert other.result().token_ids == alone(engine, "x", {"b": 1.0}, 3)



# ---------------------------------------------------------------------------- fault isolation
def test_a_row_that_fails_mid_decode_ends_alone(engine):
    """An exception while streaming one row (here its on_delta, as a closed client's would) ends
    that request; its batch-mates produce exactly what they produce alone."""
    sched = Scheduler(engine, max_batch=8)
    calls = []

    def explode(delta):
        calls.append(delta)
        if len(calls) == 2:
            raise RuntimeError("client went away")

    requests = [greedy(PROMPTS[i % 3], MIXES[i], n=6, ignore_eos=True) for i in range(4)]
    good = [sched.submit(r) for r in requests]
    bad = sched.submit(greedy("one two", {"a": 1.0}, n=6, ignore_eos=True), on_delta=explode)
    sched.run_until_idle()
    with pytest.raises(RuntimeError, match="client went away"):
        bad.result()
    for req, fut in zip(requests, good):
        assert fut.result().token_ids == alone(engine, req.prompt, req.mixture, 6)
    assert sched.idle() and sched.stats["failed"] == 1


@pytest.mark.parametrize("method, after", [("take", 1), ("wants", 2)])
def test_a_row_whose_sampling_fails_ends_alone(engine, monkeypatch, method, after):
    """`take` fails for one row: only that row ends. `wants` fails: the step's batched pick fails,
    the rows are picked one by one, and again only the row at fault ends."""
    from loramux.engine import engine as engine_module

    real = getattr(engine_module._Row, method)

    def poisoned(self, *args):
        if self.request.prompt == "poison" and len(self.tokens) == after:
            raise ValueError("sampling blew up")
        return real(self, *args)

    monkeypatch.setattr(engine_module._Row, method, poisoned)
    sched = Scheduler(engine, max_batch=8)
    good = [sched.submit(greedy(PROMPTS[i % 3], MIXES[i], n=5, ignore_eos=True)) for i in range(3)]
    bad = sched.submit(greedy("poison", {"c": 1.0}, n=5, ignore_eos=True))
    sched.run_until_idle()
    with pytest.raises(ValueError, match="sampling blew up"):
        bad.result()
    monkeypatch.undo()
    for i, fut in enumerate(good):
        assert fut.result().token_ids == alone(engine, PROMPTS[i % 3], MIXES[i], 5)


def test_a_failing_prefill_fails_only_the_row_at_fault(engine):
    """Token ids outside the vocabulary fail the embedding lookup: admitted together with good
    rows, only that row fails (the group is retried row by row) and the running batch goes on."""
    sched = Scheduler(engine, max_batch=8)
    running = sched.submit(greedy("one two", {"a": 1.0}, n=6, ignore_eos=True))
    sched.step()
    mates = [greedy(PROMPTS[0], MIXES[i], n=4, ignore_eos=True) for i in range(2)]
    good = [sched.submit(r) for r in mates]
    vocab = engine.base.model.config.vocab_size
    bad = sched.submit(greedy("ignored", None, n=4), prompt_ids=[1, vocab + 5, 2])
    sched.run_until_idle()
    with pytest.raises(IndexError):
        bad.result()
    assert running.result().token_ids == alone(engine, "one two", {"a": 1.0}, 6)
    for req, fut in zip(mates, good):
        assert fut.result().token_ids == alone(engine, req.prompt, req.mixture, 4)


def test_failing_calls_and_router_runs_end_alone(engine):
    class BrokenRouter:
        kind = "broken"

        def layer_mixture(self):
            raise RuntimeError("gate exploded")

    sched = Scheduler(engine)
    good = sched.submit(greedy("one two", {"b": 1.0}, n=3))
    call = sched.call(lambda: 1 / 0)
    routed = sched.submit(greedy("one two", None, n=3), router=BrokenRouter())
    after = sched.submit(greedy("x", None, n=3))
    sched.run_until_idle()
    with pytest.raises(ZeroDivisionError):
        call.result()
    with pytest.raises(RuntimeError, match="gate exploded"):
        routed.result()
    assert good.result().token_ids == alone(engine, "one two", {"b": 1.0}, 3)
    assert after.result().token_ids == alone(engine, "x", None, 3)


def test_stopping_resolves_every_waiting_future(engine):
    from loramux.engine.scheduler import SchedulerStopped

    sched = Scheduler(engine)
    running = sched.submit(greedy("one", None, n=8, ignore_eos=True))
    sched.step()
    futures = [running, sched.submit(greedy("one", None, n=2)), sched.call(lambda: 1)]
    sched.stop()
    for f in futures:
        with pytest.raises(SchedulerStopped):
            f.result(timeout=1)


def test_tiny_temperatures_sample_like_greedy(engine):
    """T = 1e-39 used to turn logits / T into inf - inf = nan inside the decode loop."""
    sched = Scheduler(engine)
    fut = sched.submit(greedy("one two", {"a": 1.0}, n=5, temperature=1e-39, seed=3))
    sched.run_until_idle()
    assert fut.result().token_ids == alone(engine, "one two", {"a": 1.0}, 5)
