import pytest
import torch
from torch import nn

from loramux.cpu_linear import PackedLinear, pack_linears, packing_available, unpack_linears
from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.models import load_base

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN not available in this torch build")


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packed_linear_matches_plain_linear(rows):
    torch.manual_seed(0)
    plain = nn.Linear(48, 40)
    packed = PackedLinear(plain, min_rows=1)
    x = torch.randn(rows, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is plain.weight and packed.bias is plain.bias


def test_row_threshold_picks_the_plain_kernel_below_it(monkeypatch):
    packed = PackedLinear(nn.Linear(16, 8), min_rows=4)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or torch.zeros(1))
    with torch.no_grad():
        packed(torch.randn(3, 16))  # 3 rows < 4: plain F.linear
        packed(torch.randn(2, 2, 16))  # 4 rows: packed
    assert calls == [torch.Size([2, 2, 16])]


def test_autograd_falls_back_and_gradients_flow():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4)
    packed = PackedLinear(plain, min_rows=1)
    x = torch.randn(6, 8, requires_grad=True)
    packed(x).sum().backward()
    assert plain.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(x.grad, plain.weight.sum(0).expand(6, 8).detach())


def test_weight_changed_in_place_is_packed_again():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4, bias=False)
    packed = PackedLinear(plain, min_rows=1)
    x = torch.randn(5, 8)
    with torch.no_grad():
        packed(x)
        plain.weight.mul_(2)
        torch.testing.assert_close(packed(x), x @ plain.weight.T)


def test_pack_and_unpack_keep_tied_weights_and_logits(tiny_model_dir):
    base = load_base(str(tiny_model_dir))
    model = base.model
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = pack_linears(model, min_rows=1)
    assert n == sum(isinstance(m, PackedLinear) for m in model.modules()) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    assert unpack_linears(model) == n
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_engine_on_packed_model_generates_the_same_tokens(tiny_model_dir, tmp_path):
    from loramux.library import Library

    from .library.conftest import make_peft_dir

    base = load_base(str(tiny_model_dir))
    lib = Library(tmp_path / "lib", create=True)
    for i, name in enumerate(("a", "b", "c")):
        lib.add(name, make_peft_dir(base, tmp_path / name, r=4, seed=i + 1), base=base)
    requests = [GenerationRequest(p, m, SamplingParams(max_new_tokens=8))
                for p, m in [("one two three", {"a": 0.7, "b": 0.3}), ("the quick brown fox", {"c": 1.0}),
                             ("x", None), ("abc def", {"a": 0.2, "b": 0.3, "c": 0.5})]]
    engine = Engine(base, lib)
    for name in ("a", "b", "c"):
        engine.load(name)
    plain = [r.token_ids for r in engine.generate(requests)]
    assert pack_linears(base.model, min_rows=1) > 0
    assert isinstance(next(iter(engine.fused.layers.values())).base, PackedLinear)  # packed under the fused layers
    assert [r.token_ids for r in engine.generate(requests)] == plain


def test_packed_linear_op_uses_its_owners_packed_weight_and_falls_back_otherwise(monkeypatch):
    """loramux::packed_linear (what compiled graphs call) finds the PackedLinear holding the weight;
    a weight no PackedLinear holds goes through plain F.linear."""
    plain = nn.Linear(32, 24)
    packed = PackedLinear(plain, min_rows=1)
    calls = []
    real = PackedLinear._packed_weight
    monkeypatch.setattr(PackedLinear, "_packed_weight", lambda self: calls.append(1) or real(self))
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.loramux.packed_linear(x, plain.weight, plain.bias), plain(x),
                                   rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        other = torch.randn(24, 32)
        torch.testing.assert_close(torch.ops.loramux.packed_linear(x, other, None), x @ other.T, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and packed.weight is plain.weight


def test_packed_linear_op_compiles_inside_a_graph(monkeypatch):
    packed = PackedLinear(nn.Linear(32, 24), min_rows=1)
    fn = torch.compile(lambda x: torch.relu(torch.ops.loramux.packed_linear(x, packed.weight, packed.bias)) * 2,
                       fullgraph=True, backend="inductor")
    calls = []
    real = PackedLinear._packed_weight
    monkeypatch.setattr(PackedLinear, "_packed_weight", lambda self: calls.append(1) or real(self))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), torch.relu(packed(x)) * 2, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the compiled call found its owner's packed weight, as the module's own did


def test_packed_linear_op_tells_a_transposed_view_from_its_weight():
    plain = nn.Linear(16, 16)
    packed = PackedLinear(plain, min_rows=1)  # noqa: F841 (holds the registry entry)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.loramux.packed_linear(x, plain.weight.T, None), x @ plain.weight,
                                   rtol=1e-5, atol=1e-5)
