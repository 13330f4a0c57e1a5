"""FusedModel against PEFT on a tiny Llama (fp32, max abs logit difference <= 1e-4)."""

import pytest
import torch

from loramux.errors import LoramuxError
from loramux.fusion import FusedModel
from loramux.library import Library
from loramux.library.checks import read_peft_dir
from loramux.models import load_base

from ..library.conftest import make_peft_dir

TOL = 1e-4
IDS = torch.tensor([[5, 9, 17, 33, 2, 40, 7], [11, 3, 8, 19, 23, 29, 31], [4, 4, 4, 8, 15, 16, 42]])


@pytest.fixture
def adapters(tiny_base, tmp_path):
    """Three adapters with different ranks and target modules."""
    return {
        "a": make_peft_dir(tiny_base, tmp_path / "a", targets=("q_proj", "v_proj"), r=4, seed=1),
        "b": make_peft_dir(tiny_base, tmp_path / "b", targets=("o_proj", "down_proj", "q_proj"), r=2, seed=2),
        "c": make_peft_dir(tiny_base, tmp_path / "c", targets=("gate_proj", "up_proj", "k_proj"), r=8, seed=3),
    }


def fused_with(model_dir, adapters):
    fused = FusedModel(load_base(str(model_dir)))
    for name, path in adapters.items():
        fused.add_adapter(name, read_peft_dir(path))
    return fused


def peft_with(model_dir, adapters):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_base(str(model_dir)).model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    return model.eval()


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device), **kw).logits


def test_single_adapter_equals_peft(tiny_model_dir, adapters):
    fused = fused_with(tiny_model_dir, adapters)
    peft = peft_with(tiny_model_dir, adapters)
    for name in adapters:
        peft.set_adapter(name)
        with fused.mixture(fused.sequence_mixture([{name: 1.0}] * 3)):
            ours = logits(fused.base.model)
        assert (ours - logits(peft)).abs().max() <= TOL, name


def test_weighted_mixture_equals_peft_cat(tiny_model_dir, adapters, where):
    peft = peft_with(tiny_model_dir, adapters)
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    peft.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
    peft.set_adapter("mix")
    fused = fused_with(tiny_model_dir, adapters)
    with fused.mixture(fused.sequence_mixture([weights] * 3)):
        ours = logits(fused.base.model)
    assert (ours - logits(peft)).abs().max() <= where.tol(TOL)
    with fused.mixture(fused.sequence_mixture([weights] * 3), reference=True):
        assert (logits(fused.base.model) - ours).abs().max() <= where.tol(TOL)


def test_heterogeneous_batch_equals_peft_adapter_names(tiny_model_dir, adapters, where):
    peft = peft_with(tiny_model_dir, adapters)
    fused = fused_with(tiny_model_dir, adapters)
    rows = ["b", "a", "c"]
    with fused.mixture(fused.sequence_mixture([{r: 1.0} for r in rows])):
        ours = logits(fused.base.model)
    assert (ours - logits(peft, adapter_names=rows)).abs().max() <= where.tol(TOL)


def test_rows_with_different_mixtures_equal_each_row_alone(tiny_model_dir, adapters):
    fused = fused_with(tiny_model_dir, adapters)
    rows = [{"a": 0.5, "b": 0.5}, {"c": 1.0}, {"a": 0.2, "b": 0.3, "c": 0.5}]
    with fused.mixture(fused.sequence_mixture(rows)):
        batched = logits(fused.base.model)
    for i, row in enumerate(rows):
        with fused.mixture(fused.sequence_mixture([row])), torch.no_grad():
            alone = fused.base.model(input_ids=IDS[i : i + 1].to(fused.base.model.device)).logits
        assert (batched[i] - alone[0]).abs().max() <= TOL


def test_no_mixture_is_the_base_model(tiny_model_dir, adapters):
    fused = fused_with(tiny_model_dir, adapters)
    assert torch.allclose(logits(fused.base.model), logits(load_base(str(tiny_model_dir)).model), atol=1e-6)


def test_load_unload_by_name(tiny_model_dir, tiny_base, adapters, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for name, path in adapters.items():
        lib.add(name, path, base=tiny_base)
    fused = FusedModel(load_base(str(tiny_model_dir)))
    for name in adapters:
        fused.load(lib, name)
    with fused.mixture(fused.sequence_mixture([{"c": 1.0}] * 3)):
        before = logits(fused.base.model)
    fused.remove_adapter("a")
    assert fused.adapters == ["b", "c"] and fused.slot("c") == 1
    with fused.mixture(fused.sequence_mixture([{"c": 1.0}] * 3)):
        assert torch.allclose(logits(fused.base.model), before, atol=1e-6)
    with pytest.raises(LoramuxError, match=r"adapter 'a' is not loaded; loaded adapters: \['b', 'c'\]"):
        fused.sequence_mixture([{"a": 1.0}])
    with pytest.raises(LoramuxError, match="already loaded"):
        fused.load(lib, "b")


def test_bad_mixtures_and_adapters(tiny_model_dir, tiny_base, adapters, tmp_path):
    fused = fused_with(tiny_model_dir, adapters)
    with pytest.raises(LoramuxError, match="row 1: empty mixture"):
        fused.sequence_mixture([{"a": 1.0}, {}])
    with pytest.raises(LoramuxError, match="row 0: weight nan for adapter 'a' is not finite"):
        fused.sequence_mixture([{"a": float("nan")}])
    only_attention = FusedModel(load_base(str(tiny_model_dir)), target_modules=("q_proj", "v_proj"))
    with pytest.raises(LoramuxError, match=r"adapts module\(s\) .*down_proj.* that this engine does not fuse"):
        only_attention.add_adapter("b", read_peft_dir(adapters["b"]))
    assert only_attention.adapters == []
    only_attention.add_adapter("a", read_peft_dir(adapters["a"]))  # still serves adapters that fit
    broken = read_peft_dir(adapters["c"])
    key = next(k for k in broken.tensors if "lora_B" in k)
    broken.tensors[key] = broken.tensors[key].clone().fill_(float("nan"))
    fresh = FusedModel(load_base(str(tiny_model_dir)))
    with pytest.raises(LoramuxError, match="adapter 'c' has non-finite .* weights or scale in module"):
        fresh.add_adapter("c", broken)
    assert fresh.adapters == []
    huge = read_peft_dir(adapters["a"])
    huge.config["lora_alpha"] = 1e40  # finite in JSON, infinite as the fp32 scale the fused layers hold
    with pytest.raises(LoramuxError, match="adapter 'a' has non-finite .* scale"):
        fresh.add_adapter("a", huge)


def test_adapter_memory_is_the_raw_tensor_bytes_for_equal_ranks(tiny_model_dir, tiny_base, tmp_path):
    paths = [make_peft_dir(tiny_base, tmp_path / f"p{i}", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                     "up_proj", "down_proj"), r=4, seed=i) for i in range(5)]
    fused = fused_with(tiny_model_dir, {f"p{i}": p for i, p in enumerate(paths)})
    raw = sum(t.numel() * t.element_size() for p in paths for t in read_peft_dir(p).tensors.values())
    scalings = 4 * 5 * len(fused.layers)
    assert fused.adapter_bytes() == raw + scalings


def test_folded_shared_mixture_equals_unfolded(tiny_model_dir, adapters, where):
    """fp32: a shared mixture is folded into the weights. bf16: never (see fusion/layer.py)."""
    fused = fused_with(tiny_model_dir, adapters)
    shared = fused.sequence_mixture([{"a": 0.7, "c": -0.2, "b": 0.4}])  # one row broadcasts over the batch
    with fused.mixture(shared, reference=True):
        reference = logits(fused.base.model)
    layer = next(iter(fused.layers.values()))
    base_calls = []
    hook = layer.base.register_forward_hook(lambda *args: base_calls.append(1))
    with fused.mixture(shared, fold=True):
        folded = logits(fused.base.model)
    hook.remove()
    if where.dtype == "float32":
        assert base_calls == []  # the folded weight replaces the base matmul; both would cost 2x
        assert layer._folded is not None and layer._folded[0] is shared
    else:
        assert base_calls and layer._folded is None
    assert (folded - reference).abs().max() <= where.tol(TOL)
    fused.release()
    assert layer._folded is None and layer._cache is None
    hetero = fused.sequence_mixture([{"a": 1.0}, {"b": 1.0}, {"c": 1.0}])
    with fused.mixture(hetero, fold=True):  # rows differ: nothing to fold, the fast path serves
        out = logits(fused.base.model)
    with fused.mixture(hetero, reference=True):
        assert (out - logits(fused.base.model)).abs().max() <= where.tol(TOL)
    assert layer._folded is None


def test_unfuse_gives_the_plain_base_back(tiny_model_dir):
    import torch

    from loramux.fusion import FusedModel
    from loramux.models import load_base

    base = load_base(str(tiny_model_dir))
    ids = torch.tensor([[5, 6, 7]], device=base.model.device)
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
    fused = FusedModel(base)
    fused.unfuse()
    assert all(type(m) is torch.nn.Linear for n, m in base.model.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=ids).logits, before)
    FusedModel(base)  # and it can be fused again
