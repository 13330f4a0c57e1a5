"""The fast paths of MultiLoraLinear against its reference loop and against the explicit formula."""

import pytest
import torch

from loramux.errors import LoramuxError
from loramux.fusion import FusionState, LayerMixture, MultiLoraLinear, SequenceMixture, TokenMixture

RANKS = [2, 4, None, 8, 4]  # None: the adapter does not adapt this layer
WHERE = None  # this test's (device, dtype)


@pytest.fixture(autouse=True)
def _tensors_in_where(where):
    """Base layers, inputs and factors are made in the test's dtype on its device (the layer keeps
    its factors in fp32 whatever they come in)."""
    global WHERE
    WHERE, before = where, torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, where.dtype))
    try:
        with torch.device(where.device):
            yield
    finally:
        torch.set_default_dtype(before)


def close(a, b, atol):
    """fp32: within `atol`. bf16: within the bf16 bound and 2**-5 relative (a few bf16 steps)."""
    if WHERE.dtype == "float32":
        return torch.allclose(a, b, atol=atol)
    return torch.allclose(a.float(), b.float(), atol=WHERE.tol(atol), rtol=2 ** -5)




def make_layer(d_in=12, d_out=10, ranks=RANKS, seed=0):
    torch.manual_seed(seed)
    layer = MultiLoraLinear(torch.nn.Linear(d_in, d_out), "blk.q_proj", FusionState())
    factors = []
    for i, r in enumerate(ranks):
        if r is None:
            layer.add_slot(None, None, 0.0)
            factors.append(None)
        else:
            A, B, s = torch.randn(r, d_in), torch.randn(d_out, r), 0.5 + i
            layer.add_slot(A, B, s)
            factors.append((A, B, s))
    return layer, factors


def explicit(layer, factors, x, C):
    """W0 x + Σ_i C_i s_i (B_i A_i) x with ΔW_i formed explicitly. C: (B, T|1, K)."""
    y = layer.base(x)
    for i, f in enumerate(factors):
        if f is not None:
            A, B, s = f
            y = y + C[..., i : i + 1] * s * (x @ (B @ A).T)
    return y


def run(layer, x, mix, reference=False):
    layer.state.mixture, layer.state.reference = mix, reference
    with torch.no_grad():
        return layer(x)


def test_sequence_mixture_fast_equals_reference_and_formula():
    layer, factors = make_layer()
    x = torch.randn(3, 5, 12)
    idx = torch.tensor([[0, 3, 1], [4, 4, 2], [1, 0, 3]])  # a repeated slot, and one that skips this layer
    w = torch.tensor([[0.5, -0.25, 1.0], [0.3, 0.2, 2.0], [1.0, 0.0, 0.0]])  # negative weights allowed
    mix = SequenceMixture(idx, w)
    C = torch.zeros(3, 1, 5).scatter_add_(-1, idx[:, None], w[:, None])
    fast, ref = run(layer, x, mix), run(layer, x, mix, reference=True)
    assert close(fast, ref, atol=1e-5)
    assert close(ref, explicit(layer, factors, x, C), atol=1e-4)


def test_shared_mixture_and_2d_inputs():
    layer, factors = make_layer()
    mix = SequenceMixture(torch.tensor([[1, 3]] * 4), torch.tensor([[0.6, 0.4]] * 4))
    x = torch.randn(4, 7, 12)
    assert close(run(layer, x, mix), run(layer, x, mix, reference=True), atol=1e-5)
    assert layer._cache[1][0][1].dim() == 2  # one gathered pair of factors served all rows
    x2 = torch.randn(4, 12)  # (N, d_in): one token per row
    assert close(run(layer, x2, mix), run(layer, x2[:, None], mix)[:, 0], atol=1e-6)


def test_many_rows_and_few_rows_layouts_agree():
    layer, _ = make_layer()
    for rows in ([[1, 3]] * 3, [[1, 3], [0, 4], [2, 2]]):
        mix = SequenceMixture(torch.tensor(rows), torch.tensor([[0.6, 0.4]] * 3))
        for T in (1, 100):  # 3 and 300 rows: the contiguous and the transposed-view layouts
            x = torch.randn(3, T, 12)
            assert close(run(layer, x, mix), run(layer, x, mix, reference=True), atol=1e-5)


def test_each_layout_is_made_only_when_asked_for():
    layer, _ = make_layer()
    mix = SequenceMixture(torch.tensor([[1, 3], [0, 4]]), torch.tensor([[0.6, 0.4], [1.0, 0.5]]))
    run(layer, torch.randn(2, 100, 12), mix)  # a prefill: transposed views only
    assert layer._cache[1] is None
    run(layer, torch.randn(2, 1, 12), mix)  # then decode: the contiguous layout, once
    assert layer._cache[1] is not None and layer._cache[1][0][1].is_contiguous()


def test_gathered_factors_are_cached_per_mixture_object():
    layer, _ = make_layer()
    mix = SequenceMixture(torch.tensor([[0], [1]]), torch.tensor([[1.0], [1.0]]))
    run(layer, torch.randn(2, 3, 12), mix)
    cached = layer._cache
    run(layer, torch.randn(2, 1, 12), mix)
    assert layer._cache is cached
    layer.add_slot(torch.randn(2, 12), torch.randn(10, 2), 1.0)  # slots changed: cache dropped
    assert layer._cache is None


def test_token_mixture_fast_equals_reference_and_formula():
    layer, factors = make_layer()
    B, T, m = 2, 6, 3
    torch.manual_seed(1)
    idx = torch.randint(0, 5, (B, T, m))
    w = torch.softmax(torch.randn(B, T, m), -1)
    x = torch.randn(B, T, 12)
    mix = TokenMixture(idx, w)
    C = torch.zeros(B, T, 5).scatter_add_(-1, idx, w)
    fast, ref = run(layer, x, mix), run(layer, x, mix, reference=True)
    assert close(fast, ref, atol=1e-5)
    assert close(ref, explicit(layer, factors, x, C), atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sparse_per_token_gate_equals_reference_and_formula(k):
    """Top-k per-token weights (Arrow's shape): mostly zeros, many slots."""
    layer, factors = make_layer(ranks=[2, 4, None, 8, 4, 4, 2, 8])
    torch.manual_seed(k)
    x = torch.randn(3, 7, 12)
    logits = torch.randn(3, 7, 8)
    top = logits.topk(k, dim=-1)
    C = torch.zeros_like(logits).scatter_(-1, top.indices, torch.softmax(top.values, -1))
    mix = LayerMixture(lambda name, x, mask: C)
    fast, ref = run(layer, x, mix), run(layer, x, mix, reference=True)
    assert close(fast, ref, atol=1e-5)
    assert close(ref, explicit(layer, factors, x, C), atol=1e-4)
    layer.remove_slot(1)  # the flattened factors are rebuilt for the new set of slots
    C7 = torch.cat([C[..., :1], C[..., 2:]], -1)
    assert close(run(layer, x, LayerMixture(lambda n, x, m: C7)),
                          explicit(layer, factors[:1] + factors[2:], x, C7), atol=1e-4)


def test_gate_with_a_wrong_shape_is_refused():
    layer, _ = make_layer()
    with pytest.raises(LoramuxError, match=r"gate at blk.q_proj returned weights of shape \(2, 3\); expected \(B, 5\)"):
        run(layer, torch.randn(2, 4, 12), LayerMixture(lambda n, x, m: torch.ones(2, 3)))


def test_layer_mixture_calls_the_gate_with_name_input_and_mask():
    layer, factors = make_layer()
    seen = {}
    weights = torch.softmax(torch.randn(2, 5), -1)

    def gate(name, x, mask):
        seen.update(name=name, shape=tuple(x.shape), mask=mask)
        return weights

    x = torch.randn(2, 4, 12)
    mask = torch.ones(2, 4)
    layer.state.attention_mask = mask
    out = run(layer, x, LayerMixture(gate))
    assert seen == {"name": "blk.q_proj", "shape": (2, 4, 12), "mask": mask}
    assert close(out, run(layer, x, LayerMixture(gate), reference=True), atol=1e-5)
    assert close(out, explicit(layer, factors, x, weights[:, None]), atol=1e-4)


@pytest.mark.parametrize("per_token", [False, True])
def test_a_gate_that_weighs_some_slots_computes_only_those(per_token):
    """LayerMixture.slots: a slot the gate never weighs (a general adapter loaded beside the gated
    ones) is left out of the fast path's layout; the output is the reference loop's over all slots."""
    layer, factors = make_layer(ranks=[2, 4, None, 8, 32])
    x = torch.randn(2, 4, 12, requires_grad=per_token)
    shape = (2, 4, 5) if per_token else (2, 5)
    weights = torch.softmax(torch.randn(shape), -1) * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])

    def gate(name, x, mask):
        return weights

    mix = LayerMixture(gate, slots=(0, 1, 2, 3))
    layer.state.mixture = mix
    with torch.set_grad_enabled(per_token):  # training gates: the autograd branch
        out = layer(x)
    assert close(out.detach(), run(layer, x.detach(), mix, reference=True), atol=1e-5)
    assert layer._some[(0, 1, 2, 3)][0].shape == (12, 2 + 4 + 8) and layer._flat is None  # the rank-32 slot left out
    C = weights if per_token else weights[:, None]
    assert close(out.detach(), explicit(layer, factors, x.detach(), C), atol=1e-4)
    assert close(run(layer, x.detach(), LayerMixture(gate, slots=(2,))), layer.base(x.detach()), atol=1e-6)  # skips it


def test_no_mixture_is_the_base_layer_and_remove_slot_keeps_the_others():
    layer, factors = make_layer()
    x = torch.randn(2, 3, 12)
    assert torch.equal(run(layer, x, None), layer.base(x))
    mix_before = SequenceMixture(torch.tensor([[3], [4]]), torch.tensor([[1.0], [0.5]]))
    before = run(layer, x, mix_before)
    layer.remove_slot(1)  # slots 3, 4 become 2, 3
    after = run(layer, x, SequenceMixture(torch.tensor([[2], [3]]), torch.tensor([[1.0], [0.5]])))
    assert layer.num_slots == 4 and close(before, after, atol=1e-6)


def test_layer_no_loaded_adapter_adapts_is_the_base_layer():
    layer, _ = make_layer(ranks=[None, None])
    x = torch.randn(2, 3, 12)
    mix = SequenceMixture(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[1.0, 0.5], [0.2, 0.3]]))
    for m in (mix, TokenMixture(torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(2, 3, 1))):
        assert torch.equal(run(layer, x, m), layer.base(x))


@pytest.mark.parametrize("idx, w, match", [
    (torch.tensor([[0]]), torch.tensor([[float("nan")]]), "weights must be finite"),
    (torch.tensor([[0]]), torch.tensor([[float("inf")]]), "weights must be finite"),
    (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0), "empty mixture"),
    (torch.tensor([[0, 1]]), torch.tensor([[1.0]]), "must have the same shape"),
    (torch.tensor([[0.0]]), torch.tensor([[1.0]]), "integer slot numbers"),
])
def test_bad_mixtures(idx, w, match):
    with pytest.raises(LoramuxError, match=match):
        SequenceMixture(idx, w)


def _check_decode_shapes(layer, factors, mix, C):
    for x in (torch.randn(4, 1, 12), torch.randn(4, 12)):  # decode shapes: one token per row
        fast = run(layer, x, mix)
        assert layer._union is not None and layer._union[0] is mix and layer._cache is None  # nothing gathered per row
        x3 = x if x.dim() == 3 else x[:, None]
        expected = explicit(layer, factors, x3, C)
        assert close(fast, expected if x.dim() == 3 else expected[:, 0], atol=1e-4)
        assert close(fast, run(layer, x, mix, reference=True), atol=1e-5)


@pytest.fixture
def union_on_cpu(monkeypatch):
    """The union path runs off CPU only (measured slower than gathering there); test it on CPU."""
    monkeypatch.setattr(MultiLoraLinear, "_UNION_ON_CPU", True)


def test_on_cpu_decode_rows_with_distinct_mixtures_are_gathered_not_unioned():
    layer, factors = make_layer()
    idx = torch.tensor([[0, 1, 3], [4, 3, 1], [1, 4, 2], [3, 0, 4]])
    w = torch.tensor([[0.5, 0.3, 0.2], [1.0, -0.5, 0.25], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    mix = SequenceMixture(idx, w)
    x = torch.randn(4, 1, 12)
    fast = run(layer, x, mix)
    assert layer._union is None and layer._cache[0] is mix
    assert close(fast, run(layer, x, mix, reference=True), atol=1e-5)


def test_few_tokens_per_row_with_many_distinct_mixtures_read_every_slot_once(union_on_cpu):
    layer, factors = make_layer()  # K = 5 slots
    idx = torch.tensor([[0, 1, 3], [4, 3, 1], [1, 4, 2], [3, 0, 4]])  # 12 selections of all 5 slots
    w = torch.tensor([[0.5, 0.3, 0.2], [1.0, -0.5, 0.25], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    mix = SequenceMixture(idx, w)
    C = torch.zeros(4, 1, 5).scatter_add_(-1, idx[:, None], w[:, None])
    _check_decode_shapes(layer, factors, mix, C)
    assert layer._union[1] is layer._flat[0]  # every slot selected: the dense layout, not a copy
    run(layer, torch.randn(4, 9, 12), mix)  # many tokens per row (prefill): gathered per row
    assert layer._cache is not None and layer._cache[0] is mix


def test_few_tokens_per_row_read_only_the_union_of_selected_slots(union_on_cpu):
    layer, factors = make_layer()  # K = 5 slots, of which rows use only {0, 1, 3}
    idx = torch.tensor([[0, 1], [3, 3], [1, 0], [3, 1]])  # 8 selections > 3 distinct slots; a repeated slot adds up
    w = torch.tensor([[0.5, 0.5], [1.0, -0.25], [0.2, 0.8], [0.7, 0.3]])
    mix = SequenceMixture(idx, w)
    C = torch.zeros(4, 1, 5).scatter_add_(-1, idx[:, None], w[:, None])
    _check_decode_shapes(layer, factors, mix, C)
    assert layer._flat is None and layer._union[1].shape == (12, 2 + 4 + 8)  # slots 0, 1, 3 at their own ranks


def test_few_selections_per_step_are_gathered_per_row(union_on_cpu):
    layer, factors = make_layer()
    idx, w = torch.tensor([[0], [3]]), torch.tensor([[1.0], [0.5]])  # 2 selections of 2 distinct slots: no fewer reads
    mix = SequenceMixture(idx, w)
    run(layer, torch.randn(2, 1, 12), mix)
    assert layer._union is None and layer._cache[0] is mix


def test_a_wide_slot_widens_only_itself():
    """A rank-32 adapter beside rank-2..8 ones (a library's general adapter, say): the flat layout
    keeps each slot's real rank columns, and a gathered row pads only to the widest row."""
    ranks = [2, 4, None, 8, 32]
    layer, factors = make_layer(ranks=ranks)
    x = torch.randn(3, 4, 12)
    C = torch.softmax(torch.randn(3, 4, 5), -1)
    mix = TokenMixture(torch.arange(5).expand(3, 4, 5), C)
    assert close(run(layer, x, mix), explicit(layer, factors, x, C), atol=1e-4)
    assert layer._flat[0].shape == (12, 2 + 4 + 8 + 32)  # not 5 x 32
    narrow = SequenceMixture(torch.tensor([[0, 1], [3, 2], [1, 1]]), torch.tensor([[0.5, 0.5], [1.0, 2.0], [0.3, 0.7]]))
    assert close(run(layer, x, narrow), run(layer, x, narrow, reference=True), atol=1e-5)
    assert layer._cache[2][0][1].shape == (3, 12, 8)  # the widest row: slot 3 (rank 8) and a slot that skips this layer
    wide = SequenceMixture(torch.tensor([[0, 4], [3, 1], [2, 0]]), torch.tensor([[0.5, -1.0], [1.0, 2.0], [0.3, 0.7]]))
    assert close(run(layer, x, wide), run(layer, x, wide, reference=True), atol=1e-5)
    assert [(g[0].tolist(), g[1].shape) for g in layer._cache[2]] == [([1, 2], (2, 12, 12)), ([0], (1, 12, 34))]
    shared = SequenceMixture(torch.tensor([[1, 3]] * 3), torch.tensor([[0.6, 0.4]] * 3))
    for x_ in (x, torch.randn(3, 1, 12)):
        assert close(run(layer, x_, shared), run(layer, x_, shared, reference=True), atol=1e-5)
    assert layer._cache[2][0][1].shape == (12, 4 + 8)


def test_removing_the_widest_slot_narrows_the_stack():
    layer, factors = make_layer(ranks=[2, 32, 4])
    layer.remove_slot(1)
    assert layer.max_rank == 4 and layer.ranks.tolist() == [2, 4]
    x, mix = torch.randn(2, 3, 12), SequenceMixture(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[1.0, 0.5], [0.2, 0.8]]))
    C = torch.zeros(2, 1, 2).scatter_add_(-1, mix.indices[:, None], mix.weights[:, None])
    assert close(run(layer, x, mix), explicit(layer, [factors[0], factors[2]], x, C), atol=1e-4)


def test_zero_weight_entries_need_no_columns():
    """FusedModel.sequence_mixture pads a shorter row with zero-weight entries: a row of one wide
    adapter beside rows of three narrow ones stays as wide as that adapter."""
    layer, _ = make_layer(ranks=[8, 8, 8, 32])
    mix = SequenceMixture(torch.tensor([[0, 1, 2], [3, 3, 3]]), torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    x = torch.randn(2, 3, 12)
    assert close(run(layer, x, mix), run(layer, x, mix, reference=True), atol=1e-5)
    assert layer._cache[2][0][1].shape == (2, 12, 32)  # not 3 x 32


def test_layer_mixture_slots_are_checked_and_the_reference_holds_the_gate_to_them():
    with pytest.raises(LoramuxError, match="distinct slot numbers"):
        LayerMixture(lambda *a: None, slots=(0, 0, 2))
    assert LayerMixture(lambda *a: None, slots=(3, 0)).slots == (0, 3)
    layer, _ = make_layer()
    weights = torch.softmax(torch.randn(2, 5), -1)
    x = torch.randn(2, 3, 12)
    with pytest.raises(LoramuxError, match="slot 7 does not exist"):
        run(layer, x, LayerMixture(lambda *a: weights, slots=(0, 7)))
    with pytest.raises(LoramuxError, match="outside LayerMixture.slots"):  # slot 4 has weight: the fast path drops it
        run(layer, x, LayerMixture(lambda *a: weights, slots=(0, 1, 2, 3)), reference=True)
    layer.move_slot(4, 0)  # the kept layouts follow the slots
    only = weights * torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    run(layer, x, LayerMixture(lambda *a: only, slots=(0, 1)))
    assert (0, 1) in layer._some
    layer.move_slot(0, 4)
    assert layer._some is None


def test_the_union_of_slots_that_skip_this_layer_adds_nothing(union_on_cpu):
    layer, _ = make_layer()  # slot 2 does not adapt this layer
    mix = SequenceMixture(torch.tensor([[2], [2], [2]]), torch.tensor([[1.0], [0.5], [2.0]]))
    x = torch.randn(3, 1, 12)
    assert close(run(layer, x, mix), layer.base(x), atol=1e-6)
    assert layer._union is not None and layer._union[1].shape == (12, 0)


def test_slot_ranks_are_kept_on_the_host():
    layer, _ = make_layer()
    assert layer.ranks.device.type == "cpu" and layer.ranks.tolist() == [2, 4, 0, 8, 4]


@pytest.mark.parametrize("T", [1, 5, 100])  # decode, a short prefill, the transposed-view layout
def test_rows_of_very_different_widths_are_computed_in_two_groups(T):
    """A wide adapter serving some rows (a general adapter, for prompts a router abstained on)
    beside narrow ones: the narrow rows are not padded to the wide rows' width."""
    layer, _ = make_layer(ranks=[2, 4, None, 2, 32])
    idx = torch.tensor([[0, 1], [4, 4], [3, 0], [1, 3], [4, 4], [0, 0]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7], [1.0, -0.5], [1.0, 0.0], [1.0, 0.0]])
    mix = SequenceMixture(idx, w)
    x = torch.randn(6, T, 12)
    reference = run(layer, x, mix, reference=True)
    assert close(run(layer, x, mix), reference, atol=1e-4)
    groups = layer._cache[2]
    assert [(g[0].tolist(), g[1].shape[-1]) for g in groups] == [([0, 2, 3, 5], 6), ([1, 4], 32)]
    x.requires_grad_(True)  # the autograd branch
    layer.state.mixture = mix
    out = layer(x)
    out.sum().backward()
    assert close(out.detach(), reference, atol=1e-4) and x.grad is not None
    assert close(run(layer, x.detach()[:, 0], mix), reference[:, 0], atol=1e-4)  # 2-D inputs
