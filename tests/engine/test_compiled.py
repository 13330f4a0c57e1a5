"""The compiled decode path (engine/compiled.py, engine/graph.py) against the eager one."""

import pytest
import torch

from loramux.bench.speed import random_adapter
from loramux.engine import compiled as compiled_module
from loramux.engine.compiled import CompiledDecoder, table_width
from loramux.engine.scheduler import Scheduler
from loramux.errors import LoramuxError

from .test_engine import PROMPTS, engine, greedy, lib  # noqa: F401 (fixtures)


def compiled(engine, backend="eager"):
    """The same engine decoding through the compiled step ("eager": the graph run uncompiled)."""
    engine.compiled = CompiledDecoder(engine.fused, backend=backend)
    return engine


def alone(engine, request):
    """The request on its own through the eager path."""
    saved, engine.compiled = engine.compiled, None
    try:
        return engine.generate([request])[0].token_ids
    finally:
        engine.compiled = saved


def test_rows_joining_leaving_and_reusing_slots_match_each_request_alone(where, engine):
    """fp32: token for token. Rows join a running batch, one retires and a joiner takes its
    slot, and a later joiner mixes more adapters than anyone before (the adapter table grows)."""
    if where.dtype != "float32":
        pytest.skip("token-for-token equality is an fp32 claim (bf16: the step test below)")
    compiled(engine)
    sched = Scheduler(engine, max_batch=8)
    short = greedy(PROMPTS[0], {"a": 1.0}, n=2)
    requests = [short, greedy(PROMPTS[1], None, n=12), greedy(PROMPTS[2], {"c": 1.0}, n=6),
                greedy(PROMPTS[0], {"a": 0.5, "b": -0.5}, n=7), greedy(PROMPTS[1], {"a": 0.2, "b": 0.7, "c": 0.3}, n=9)]
    futures = [sched.submit(r) for r in requests[:2]]
    for _ in range(3):  # the short one retires
        sched.step()
    assert futures[0].done() and sched.state.slots == [1]
    futures.append(sched.submit(requests[2]))
    sched.step()
    assert sched.state.slots == [1, 0]  # the freed slot is taken again
    futures += [sched.submit(r) for r in requests[3:]]
    sched.run_until_idle()
    for request, future in zip(requests, futures):
        assert future.result().token_ids == alone(engine, request)
    assert sched.state.static is None  # the batch ended: its slots went with it


def test_the_graph_step_equals_the_model_step(where, engine):
    """One decode step of three rows (two mixtures and the base model): DecodeGraph's logits
    against transformers' forward through the fused layers."""
    got, ref = _one_step(compiled(engine).compiled, engine)
    tol = where.tol(1e-4)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_the_few_row_attention_kernel_and_the_batched_matmuls_agree(where, engine, monkeypatch):
    """An fp32 CPU step's attention is one C++ call a layer (kernels/decode_attention.cpp);
    without it two batched matmuls: both give the model's logits."""
    from loramux.engine import graph

    if where.dtype != "float32" or where.device != "cpu":
        pytest.skip("the kernel covers fp32 CPU rows")
    dec = compiled(engine).compiled
    op = graph._OPS["attention"]
    assert op is not None
    calls = []
    monkeypatch.setitem(graph._OPS, "attention", lambda *args: calls.append(1) or op(*args))
    got, ref = _one_step(dec, engine)
    assert len(calls) == engine.base.model.config.num_hidden_layers
    monkeypatch.setitem(graph._OPS, "attention", None)
    matmuls, _ = _one_step(compiled(engine).compiled, engine)
    assert len(calls) == engine.base.model.config.num_hidden_layers
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(matmuls, ref, atol=1e-4, rtol=1e-4)


def test_the_graph_step_on_packed_weights_equals_the_model_step(where, engine):
    """Rows above the GEMV threshold go through the oneDNN-packed weights (loramux::packed_linear),
    as a server that packed its linears does."""
    from loramux.cpu_linear import PackedLinear, pack_linears, packing_available, unpack_linears

    if where.device != "cpu" or where.dtype != "float32" or not packing_available():
        pytest.skip("packing covers fp32 CPU linears with oneDNN")
    assert pack_linears(engine.base.model, min_rows=1) > 0
    try:
        dec = compiled(engine).compiled
        dec.graph.gemv_rows = 0  # every slot count takes the packed kernel
        calls = []
        real = PackedLinear._packed_weight
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PackedLinear, "_packed_weight", lambda self: calls.append(1) or real(self))
            got, ref = _one_step(dec, engine)
        assert calls  # the graph's linears ran on their owners' packed weights
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    finally:
        unpack_linears(engine.base.model)


def _one_step(dec, engine):
    """(the compiled step's logits, the model's) for one decode step of three rows."""
    tok = engine.base.tokenizer
    model = engine.base.model
    device = next(model.parameters()).device
    mixtures = [{"a": 1.0}, None, {"b": 0.7, "c": 0.3}]
    ids = [tok(p)["input_ids"] for p in ("one two three four", "x", "The quick brown")]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    with torch.no_grad(), engine.fused.mixture(engine.sequence_mixture(mixtures)):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        slots = dec.slots()
        taken = slots.admit(out.cache, mask, mixtures)
        nxt = out.logits[:, -1].argmax(-1)
        mask2 = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
        ref = model(input_ids=nxt[:, None], attention_mask=mask2, position_ids=mask.sum(-1, keepdim=True),
                    cache=out.cache, use_cache=True).logits[:, -1]
    got = slots.step(taken, nxt.tolist())
    assert slots.capacity == 4 and taken == [0, 1, 2]
    return got, ref


def test_unsupported_models_are_refused_with_the_reason(engine, monkeypatch):
    monkeypatch.setattr(engine.base.model.config, "model_type", "gemma")
    with pytest.raises(LoramuxError, match="does not support.*gemma"):
        CompiledDecoder(engine.fused)


def test_inductor_compiles_once_per_slot_count_across_lengths(where, engine, monkeypatch):
    """Real compilation (Inductor) on the tiny model: the warm-up compiles every shape up front
    (1 and 2 slots, with and without LoRA), then generation adds no compile, with equal tokens,
    although the context grows past the first cache view (64 positions) and the LoRA table's
    positions (3), width (8) and picks per row (3) are none of the warm-up's (2, 4 and 2: all
    dynamic dimensions)."""
    if where.dtype != "float32" or where.device != "cpu":
        pytest.skip("one compile is enough")
    requests = [greedy(PROMPTS[1], {"a": 1.0}, n=70, ignore_eos=True),
                greedy(PROMPTS[0], {"b": 0.6, "c": 0.3, "a": 0.1}, n=70, ignore_eos=True)]
    eager = engine.generate(requests)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(compiled_module, "_RANK_STEP", 4)
    dec = compiled(engine, backend="inductor").compiled
    assert sorted(dec.warmup(2)) == ["rows1", "rows1_lora", "rows2", "rows2_lora"]
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ours = engine.generate(requests)
    assert [r.token_ids for r in ours] == [r.token_ids for r in eager]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles == 4


def test_the_lora_table_holds_each_adapter_once_and_reuses_positions(engine):
    """Rows that mix the same adapter share its table position; an adapter no row uses any more
    keeps its position until a new adapter needs it, but not one that rows admitted with it
    mix. (That rows step to the model's logits: the tests above.)"""
    dec = compiled(engine).compiled
    slots = dec.slots()
    w = slots.width
    assert w == 8  # the widest rank of the fixture's adapters

    def admit(mixtures):
        return _admit(engine, slots, mixtures)

    first = admit([{"a": 1.0}, {"a": 0.5, "b": 0.5}, None])
    assert slots.table == ["a", "b"] and slots.refs == {"a": 2, "b": 1}
    assert _picked(slots, first[1]) == {"a": 0.5, "b": 0.5} and _picked(slots, first[2]) == {}
    slots.free([first[1]])  # b is unused now, its factors kept
    assert slots.refs == {"a": 1, "b": 0} and slots.table == ["a", "b"]
    again = admit([{"b": 1.0}])  # reuses b's position: nothing copied, nothing grown
    assert slots.table == ["a", "b"] and slots.refs["b"] == 1
    slots.free(again)
    admit([{"c": 1.0}])  # takes the unused position of b
    assert slots.table == ["a", "c"] and "b" not in slots.refs
    slots.free([first[0]])
    both = admit([{"b": 1.0}, {"a": 0.2, "b": 0.3}])  # a is unused, but these rows need it: b gets a new position
    assert slots.table == ["a", "c", "b"] and slots.refs == {"a": 1, "b": 2, "c": 1}
    mixtures = {s: m for s, m in enumerate(slots.mixtures) if slots.used[s]}
    for s, m in mixtures.items():  # each used row picks its mixture's adapters at their weights
        assert _picked(slots, s) == pytest.approx(m or {})
    assert both and slots.lora["q_proj"][0].shape[1:3] == (len(slots.table), w)


def _picked(slots, slot):
    """Slot `slot`'s adapters and weights as the step sees them (picks of weight 0 left out)."""
    picks, weights = slots.rows()
    return {slots.table[p]: w for p, w in zip(picks[slot].tolist(), weights[slot].tolist()) if w}


def _admit(engine, slots, mixtures):
    return slots.admit(*_prefill(engine, mixtures), mixtures)


def _prefill(engine, mixtures):
    """The eager prefill of one prompt per mixture: its cache and mask, as admit takes them."""
    ids = [engine.base.tokenizer(PROMPTS[0])["input_ids"]] * len(mixtures)
    input_ids = torch.tensor(ids)
    mask = torch.ones_like(input_ids)
    with torch.no_grad(), engine.fused.mixture(engine.sequence_mixture(mixtures)):
        out = engine.base.model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    return out.cache, mask


def test_the_lora_table_sheds_positions_no_row_uses(engine):
    """The table holds every adapter's factors: once its unused trailing positions are more than
    half of it, they go, and a table no row uses is dropped. It keeps 2 positions at least (a
    dimension of 1 would be one more compiled shape)."""
    for i in range(2):  # five adapters, so that a table can shrink to rows still using it (rank 8: one
        # position each, the fixture's widest rank being the width; pieces: the test below)
        engine.fused.add_adapter(f"x{i}", random_adapter(engine.base, 8, i))
    slots = compiled(engine).compiled.slots()
    rows = _admit(engine, slots, [{"a": 1.0}, {"b": 0.5, "a": 0.5}, {"c": 1.0}, {"x0": 1.0}, {"x1": 1.0}])
    assert slots.table == ["a", "b", "c", "x0", "x1"]
    slots.free([rows[4], rows[3]])  # two of five unused: kept (x0 and x1 stay cached for a later row)
    assert slots.table == ["a", "b", "c", "x0", "x1"]
    slots.free([rows[2]])  # three of five: the table shrinks to what is used
    assert slots.table == ["a", "b"] and slots.refs == {"a": 2, "b": 1}
    assert slots.lora["q_proj"][0].shape[1:3] == (2, slots.width)
    assert _picked(slots, rows[0]) == {"a": 1.0} and _picked(slots, rows[1]) == {"b": 0.5, "a": 0.5}
    slots.free([rows[1]])  # b unused, but a table keeps 2 positions
    assert slots.table == ["a", "b"] and _picked(slots, rows[0]) == {"a": 1.0}
    slots.free([rows[0]])
    assert slots.table == [] and slots.lora is None and slots.rows() is None
    again = _admit(engine, slots, [{"c": 0.5}])  # and grows again from nothing, to 2 positions
    assert slots.table == ["c", None] and slots.lora["q_proj"][0].shape[1:3] == (2, slots.width)
    assert _picked(slots, again[0]) == {"c": 0.5} and slots.rows()[0].shape[1] == 2
    more = _admit(engine, slots, [{"a": 0.25, "b": 0.25}])  # takes the free position, then grows
    assert slots.table == ["c", "a", "b"] and _picked(slots, more[0]) == {"a": 0.25, "b": 0.25}


def test_the_table_width_is_the_rank_most_adapters_have():
    assert table_width([8] * 14 + [112]) == 8  # a general adapter does not widen the routed ones
    assert table_width([4, 8]) == 8 and table_width([4, 4, 8]) == 4
    assert table_width([1, 1]) == 2 and table_width([0, 0]) == 0 == table_width([])


def test_a_wider_adapter_takes_several_positions_and_decodes_as_alone(where, engine):
    """A rank-20 adapter beside two rank-8 ones (and ranks 4 and 2): a position keeps 8 columns,
    the wide adapter takes three (8 + 8 + 4), a row mixing it picks all three at its weight, and
    (fp32) rows decode token for token as each would alone on the eager path. An unused wide
    adapter whose pieces straddle the table's cut goes whole."""
    engine.fused.add_adapter("d", random_adapter(engine.base, 8, 6))
    engine.fused.add_adapter("wide", random_adapter(engine.base, 20, 7))
    slots = compiled(engine).compiled.slots()
    assert slots.width == 8
    rows = _admit(engine, slots, [{"a": 1.0}, {"wide": 1.0}, {"b": 0.5, "wide": 0.5}])
    assert slots.table == ["a", "wide", "wide", "wide", "b"]
    picks, weights = slots.rows()
    assert picks[rows[2]].tolist() == [4, 1, 2, 3] and weights[rows[2]].tolist() == [0.5] * 4
    assert _picked(slots, rows[1]) == {"wide": 1.0} and _picked(slots, rows[0]) == {"a": 1.0}
    q = slots.lora["q_proj"][0]  # (layers, P, W, d_in): the third piece holds columns 16..19, then zeros
    assert bool(q[:, 3, :4].any()) and not bool(q[:, 3, 4:].any())
    slots.free([rows[1], rows[2]])  # wide unused, kept; b unused
    slots.free([rows[0]])  # nothing used: the table goes
    assert slots.table == [] and slots.lora is None
    kept = _admit(engine, slots, [{"a": 1.0}, {"wide": 1.0}, {"b": 1.0}])
    slots.free([kept[1], kept[2]])  # the cut at 2 positions falls inside wide's pieces
    assert slots.table == ["a", None] and "wide" not in slots.refs
    assert _picked(slots, kept[0]) == {"a": 1.0}
    if where.dtype != "float32":
        return
    sched = Scheduler(engine, max_batch=4)
    requests = [greedy(PROMPTS[0], {"wide": 1.0}, n=6), greedy(PROMPTS[1], {"a": 0.4, "wide": 0.6}, n=6),
                greedy(PROMPTS[2], {"b": 1.0}, n=6)]
    futures = [sched.submit(r) for r in requests]
    sched.run_until_idle()
    for request, future in zip(requests, futures):
        assert future.result().token_ids == alone(engine, request)


def test_a_failure_while_filling_the_table_leaves_it_consistent(engine, monkeypatch):
    """An error half-way through a row's adapters (e.g. out of memory) fails that admission
    alone: no slot held, no adapter counted or named at a half-written position, the running
    rows' picks unchanged. Twice: before any factor is written, and after an unused adapter's
    position was taken and partly overwritten."""
    engine.fused.add_adapter("x0", random_adapter(engine.base, 8, 0))  # one position (the width: 8)
    slots = compiled(engine).compiled.slots()
    running = _admit(engine, slots, [{"a": 1.0}])
    real = slots.decoder.fused.slot

    def failing(name):
        if name == "c":
            raise MemoryError("out of memory")
        return real(name)

    prefilled = _prefill(engine, [{"b": 1.0, "c": 1.0}])  # the prefill succeeds, the table's copy fails
    monkeypatch.setattr(slots.decoder.fused, "slot", failing)
    with pytest.raises(MemoryError):
        slots.admit(*prefilled, [{"b": 1.0, "c": 1.0}])
    assert [s for s, u in enumerate(slots.used) if u] == running
    assert slots.refs.get("a") == 1 and not slots.refs.get("b") and "c" not in slots.table
    monkeypatch.undo()
    assert slots.table == ["a", "b", None]  # b placed, its row failed: unused, kept for a later row
    slots.free(_admit(engine, slots, [{"c": 1.0}]))  # c, unused too: the table has no empty position

    class FailingWrites(dict):  # the factors' copy fails at its 10th (layer, projection)
        def items(self):
            for n, item in enumerate(super().items()):
                if n == 10:
                    raise MemoryError("out of memory")
                yield item

    prefilled = _prefill(engine, [{"x0": 1.0}])
    monkeypatch.setattr(slots.decoder, "fused_at", FailingWrites(slots.decoder.fused_at))
    with pytest.raises(MemoryError):
        slots.admit(*prefilled, [{"x0": 1.0}])  # takes b's unused position, fails writing it
    assert slots.table == ["a", None, "c"] and "b" not in slots.refs and "x0" not in slots.refs
    assert [s for s, u in enumerate(slots.used) if u] == running and _picked(slots, running[0]) == {"a": 1.0}
    monkeypatch.undo()
    ok = _admit(engine, slots, [{"x0": 1.0}])  # the table still serves
    assert slots.table == ["a", "x0", "c"] and slots.refs["x0"] == 1 and _picked(slots, ok[0]) == {"x0": 1.0}
