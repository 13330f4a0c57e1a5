"""The compiled decode path (engine/compiled.py, engine/graph.py) against the eager one."""

import pytest
import torch

from loramux.engine.compiled import CompiledDecoder
from loramux.engine.scheduler import Scheduler
from loramux.errors import LoramuxError

from .test_engine import PROMPTS, engine, greedy, lib  # noqa: F401 (fixtures)

MIXES = [{"a": 1.0}, {"b": 0.7, "c": 0.3}, None, {"c": 1.0}, {"a": 0.5, "b": -0.5}]


def compiled(engine, backend="eager"):
    """The same engine decoding through the compiled step ("eager": the graph run uncompiled)."""
    engine.compiled = CompiledDecoder(engine.fused, backend=backend)
    return engine


def run(engine, requests, join_after=2):
    """Two requests start; the rest join after `join_after` steps (rows join mid-flight)."""
    sched = Scheduler(engine, max_batch=8)
    first = [sched.submit(r) for r in requests[:2]]
    for _ in range(join_after):
        sched.step()
    later = [sched.submit(r) for r in requests[2:]]
    sched.run_until_idle()
    return [f.result() for f in first + later]


def test_compiled_decode_matches_eager_with_rows_joining_and_leaving(engine, where):
    requests = [greedy(PROMPTS[i % 3], MIXES[i], n=4 + 3 * i) for i in range(5)]
    if where.dtype != "float32":  # bf16: the graph rounds in another order; compare the first logits
        eager = engine.generate(requests[:3])
        ours = compiled(engine).generate(requests[:3])
        assert [r.token_ids[:1] for r in ours] == [r.token_ids[:1] for r in eager]
        return
    eager = run(engine, requests)
    ours = run(compiled(engine), requests)
    assert [r.token_ids for r in ours] == [r.token_ids for r in eager]
    assert engine.compiled.capacity == 0  # the batch ended: slots and cache freed


def test_the_graph_step_equals_the_model_step(engine, where):
    """One decode step: DecodeGraph's logits against transformers' forward with the fused layers."""
    if where.dtype != "float32":
        pytest.skip("fp32 bound")
    dec = compiled(engine).compiled
    tok = engine.base.tokenizer
    model = engine.base.model
    mixtures = [{"a": 1.0}, None, {"b": 0.7, "c": 0.3}]
    prompts = ["one two three four", "x", "The quick brown"]
    ids = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    mix = engine.sequence_mixture(mixtures)
    with torch.no_grad(), engine.fused.mixture(mix):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        slots = dec.admit(out.cache, mask, mixtures)
        nxt = out.logits[:, -1].argmax(-1)
        mask2 = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
        ref = model(input_ids=nxt[:, None], attention_mask=mask2, position_ids=mask.sum(-1, keepdim=True),
                    cache=out.cache, use_cache=True).logits[:, -1]
    got = dec.step(slots, nxt.tolist())
    assert dec.capacity == 4 and slots == [0, 1, 2]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_unsupported_models_are_refused_with_the_reason(engine, monkeypatch):
    monkeypatch.setattr(engine.base.model.config, "model_type", "gemma")
    with pytest.raises(LoramuxError, match="does not support.*gemma"):
        CompiledDecoder(engine.fused)


def test_inductor_compiles_once_per_slot_count_across_lengths(engine, where):
    """Real compilation (Inductor) on the tiny model: equal tokens, and a context that grows past
    the first cache view (64 positions) reuses the graph (the length is a dynamic dimension)."""
    if where.dtype != "float32":
        pytest.skip("one compile is enough")
    requests = [greedy(PROMPTS[1], {"a": 1.0}, n=70, ignore_eos=True),
                greedy(PROMPTS[0], {"b": 0.7, "c": 0.3}, n=70, ignore_eos=True)]
    eager = engine.generate(requests)
    torch._dynamo.reset()
    dec = compiled(engine, backend="inductor").compiled
    ours = engine.generate(requests)
    assert [r.token_ids for r in ours] == [r.token_ids for r in eager]
    assert list(dec.compile_seconds) == ["rows2_lora"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
