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

