import pytest
import torch

from loramux.errors import LoramuxError
from loramux.fusion import FusedModel
from loramux.library import Library
from loramux.models import load_base
from loramux.routers.arrow import ArrowConfig, ArrowRouter, library_prototypes, top_right_singular_vector
from loramux.routers.arrow.prototypes import CACHE_DIR

TARGETS = ("q_proj", "v_proj", "up_proj")


def make_gapped_peft_dir(base, path, *, r=4, seed=0, targets=TARGETS):
    """A random PEFT LoRA whose ΔW has well separated singular values at every module, so PEFT's
    power iteration (15 steps) converges to the same prototype as an exact SVD."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base.model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                q, _ = torch.linalg.qr(torch.randn(p.shape[1], p.shape[0]))
                p.copy_(((q.T * torch.tensor([1.0, 0.25, 0.06, 0.015][: p.shape[0]])[:, None]) * 3).to(p))
            elif "lora_B" in name:
                q, _ = torch.linalg.qr(torch.randn(p.shape[0], p.shape[1]))
                p.copy_(q)
    model.save_pretrained(path)
    model.unload()
    return path


@pytest.fixture
def arrow_lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for i in range(5):
        lib.add(f"t{i}", make_gapped_peft_dir(tiny_base, tmp_path / f"p{i}", seed=i), base=tiny_base, tasks=[f"t{i}"])
    return lib


def fused_with(model_dir, lib, names=None):
    fused = FusedModel(load_base(str(model_dir)))
    for n in names or lib.names():
        fused.load(lib, n)
    return fused


@pytest.mark.parametrize("r, d_in, d_out", [(1, 7, 5), (4, 12, 10), (8, 20, 6)])
def test_prototype_is_the_top_right_singular_vector(r, d_in, d_out):
    torch.manual_seed(r)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    v = top_right_singular_vector(A, B)
    ref = torch.linalg.svd((B @ A).double()).Vh[0].float()
    assert torch.allclose(v.norm(), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(v, ref, atol=1e-5) or torch.allclose(v, -ref, atol=1e-5)
    assert float((B @ A @ v).norm()) == pytest.approx(float(torch.linalg.matrix_norm(B @ A, 2)), rel=1e-5)


def test_prototypes_are_cached_and_recomputed_when_an_adapter_changes(arrow_lib, tiny_base, tmp_path):
    cache = arrow_lib.path / CACHE_DIR
    first = library_prototypes(arrow_lib, "t0")
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("t0-svd-")
    stamp = (cache / files[0]).stat().st_mtime_ns
    again = library_prototypes(arrow_lib, "t0")
    assert (cache / files[0]).stat().st_mtime_ns == stamp  # read, not recomputed
    assert all(torch.equal(first[m], again[m]) for m in first)
    arrow_lib.add("t0", make_gapped_peft_dir(tiny_base, tmp_path / "new", seed=9), base=tiny_base, tasks=["t0"],
                  replace=True)
    fresh = library_prototypes(arrow_lib, "t0")
    assert sorted(p.name for p in cache.iterdir()) != files and len(list(cache.iterdir())) == 1
    assert not torch.allclose(fresh["model.layers.0.self_attn.q_proj"], first["model.layers.0.self_attn.q_proj"])


def test_top_k_and_temperature_semantics(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib)
    module = "model.layers.1.mlp.up_proj"
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2, temperature=0.5))
    P = router.prototypes[module]  # (5, d_in)
    x = (P[3] * 2.0)[None, None]  # a token along adapter 3's prototype
    C = router.gate(module, x, None)[0, 0]
    logits = (x[0, 0] @ P.T).abs() / 0.5
    kept = logits.topk(2).indices
    assert int(kept[0]) == 3 and set(torch.nonzero(C).flatten().tolist()) == set(kept.tolist())
    assert torch.allclose(C[kept], torch.softmax(logits[kept], -1), atol=1e-6)
    assert float(C.sum()) == pytest.approx(1.0)
    cold = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2, temperature=1e-3)).gate(module, x, None)[0, 0]
    assert float(cold[3]) == pytest.approx(1.0)  # T -> 0: all weight on the best adapter
    hot = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=5, temperature=1e4)).gate(module, x, None)[0, 0]
    assert torch.allclose(hot, torch.full((5,), 0.2), atol=1e-3)  # T -> inf: uniform over the kept


def test_candidates_restrict_the_choice(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib)
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=4, candidates=("t1", "t4")))
    C = router.gate("model.layers.0.self_attn.q_proj", torch.randn(2, 3, 32), None)
    assert set(torch.nonzero(C.sum((0, 1))).flatten().tolist()) == {1, 4}  # k capped at the 2 candidates
    with pytest.raises(LoramuxError, match=r"candidates \['zz'\] are not loaded"):
        ArrowRouter(fused, arrow_lib, ArrowConfig(candidates=("zz",)))


def test_the_librarys_general_adapter_is_never_a_candidate(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib)
    plain = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=4))
    arrow_lib.set_general("t2")  # loaded (it serves abstentions), never routed to
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=4))
    assert router.candidates == ["t0", "t1", "t3", "t4"] and plain.candidates == ["t0", "t1", "t2", "t3", "t4"]
    C = router.gate("model.layers.0.self_attn.q_proj", torch.randn(2, 3, 32), None)
    assert float(C[..., 2].abs().sum()) == 0.0
    assert router.layer_mixture().slots == (0, 1, 3, 4)  # the fused layers leave it out of Arrow's forward
    ids = torch.tensor([fused.base.tokenizer("The quick brown fox")["input_ids"]], device=fused.base.model.device)
    with torch.no_grad(), fused.mixture(router.layer_mixture()):
        fast = fused.base.model(input_ids=ids).logits
    with torch.no_grad(), fused.mixture(router.layer_mixture(), reference=True):  # every slot, t2's at weight 0
        assert torch.allclose(fast, fused.base.model(input_ids=ids).logits, atol=1e-5)
    gks = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2, gks=True, general=("t4",)))  # t4 subtracted at -1
    assert gks.layer_mixture().slots == (0, 1, 3, 4)
    with torch.no_grad(), fused.mixture(gks.layer_mixture()):
        fast = fused.base.model(input_ids=ids).logits
    with torch.no_grad(), fused.mixture(gks.layer_mixture(), reference=True):
        assert torch.allclose(fast, fused.base.model(input_ids=ids).logits, atol=1e-5)
    assert router.cache_key != plain.cache_key  # cached predictions of one are not the other's
    with pytest.raises(LoramuxError, match="'t2' is the library's general adapter"):
        ArrowRouter(fused, arrow_lib, ArrowConfig(candidates=("t1", "t2")))


@pytest.mark.parametrize("top_k, temperature, prototype", [(2, 1.0, "svd"), (4, 0.5, "svd"), (1, 1.0, "svd"),
                                                           (2, 1.0, "power"), (3, 2.0, "power")])
def test_logits_equal_peft_create_arrow_model(tiny_model_dir, arrow_lib, top_k, temperature, prototype):
    """Exact SVD prototypes match PEFT's when its power iteration converges (a clear spectral gap,
    as built here); with prototype='power' loramux runs PEFT's seeded iteration and matches always."""
    from peft import ArrowConfig as PeftArrowConfig
    from peft import create_arrow_model

    names = arrow_lib.names()
    fused = fused_with(tiny_model_dir, arrow_lib)
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=top_k, temperature=temperature, prototype=prototype,
                                                       power_seed=7))
    tok = fused.base.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]], device=fused.base.model.device)
    with torch.no_grad(), fused.mixture(router.layer_mixture()):
        ours = fused.base.model(input_ids=ids).logits
    with torch.no_grad(), fused.mixture(router.layer_mixture(), reference=True):
        reference = fused.base.model(input_ids=ids).logits
    peft_base = load_base(str(tiny_model_dir))
    peft = create_arrow_model(peft_base.model, [str(arrow_lib.adapter_dir(n)) for n in names],
                              PeftArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=7)).eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    with torch.no_grad():
        base_logits = load_base(str(tiny_model_dir)).model(input_ids=ids).logits
    assert float((ours - base_logits).abs().max()) > 1e-2  # the adapters do move the logits
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert float((ours - reference).abs().max()) <= 1e-4


def test_route_reports_what_each_prompt_used(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib)
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2))
    r1, r2 = router.route(["one two three", "The quick brown fox jumps over the lazy dog"])
    for r in (r1, r2):
        assert r.router == "arrow" and r.granularity == "token" and r.mixture is None
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert list(r.weights) == sorted(r.weights, reverse=True) and set(r.adapters) <= set(arrow_lib.names())
        assert len(r.layers) == len(fused.layers) // 7 * 3  # the 3 adapted module kinds per block
        # each token keeps 2 adapters per module; a module's mean over tokens sums to 1
        assert all(sum(w.values()) == pytest.approx(1.0, abs=1e-3) for w in r.layers.values())


def test_loaded_adapters_changing_needs_refresh(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib, ["t0", "t1"])
    router = ArrowRouter(fused, arrow_lib)
    fused.load(arrow_lib, "t2")
    with pytest.raises(LoramuxError, match="call refresh"):
        router.gate("model.layers.0.self_attn.q_proj", torch.randn(1, 1, 32), None)
    router.refresh()
    assert router.gate("model.layers.0.self_attn.q_proj", torch.randn(1, 1, 32), None).shape == (1, 1, 3)
    with pytest.raises(LoramuxError, match="top_k must be a positive integer"):
        ArrowConfig(top_k=0)
    with pytest.raises(LoramuxError, match="temperature must be a finite number > 0"):
        ArrowConfig(temperature=0)


def test_power_prototypes_follow_pefts_procedure_and_approach_the_svd():
    from loramux.routers.arrow.prototypes import power_iteration_vector

    torch.manual_seed(0)
    A, B = torch.randn(4, 30), torch.randn(20, 4)
    exact = top_right_singular_vector(A, B)
    few, many = power_iteration_vector(A, B, iters=2, seed=3), power_iteration_vector(A, B, iters=500, seed=3)
    assert abs(float(many @ exact)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(few @ exact)) <= abs(float(many @ exact))
    assert torch.equal(power_iteration_vector(A, B, seed=3), power_iteration_vector(A, B, seed=3))  # seeded


def _dense_delta(layer, k):
    return (layer.scaling[k] * layer.lora_B[k].double() @ layer.lora_A[k].double())


@pytest.mark.parametrize("general", [(), ("t4",), ("t3", "t4")])
def test_gks_prototypes_are_those_of_the_purified_deltas(tiny_model_dir, arrow_lib, general):
    """GenKnowSub in ΔW space: each routed adapter's prototype is the top right singular vector of
    ΔW_i − mean_g ΔW_g (g: the general adapters, or every routed adapter when none are named)."""
    fused = fused_with(tiny_model_dir, arrow_lib)
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(gks=True, general=general))
    routed = [k for k, n in enumerate(fused.adapters) if n not in general]
    subtract = [k for k, n in enumerate(fused.adapters) if n in general] or routed
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        layer = fused.layers[module]
        mean = sum(_dense_delta(layer, g) for g in subtract) / len(subtract)
        for k in routed:
            ref = torch.linalg.svd(_dense_delta(layer, k) - mean).Vh[0]
            cos = float(torch.nn.functional.cosine_similarity(router.prototypes[module][k].double(), ref, dim=0))
            assert abs(cos) == pytest.approx(1.0, abs=1e-5)
        assert bool(router.valid[module][routed].all()) and not bool(router.valid[module][
            [k for k in range(len(fused.adapters)) if k not in routed]].any())
    plain = ArrowRouter(fused, arrow_lib, ArrowConfig())
    assert not torch.allclose(plain.prototypes[module][0], router.prototypes[module][0], atol=1e-3)


@pytest.mark.parametrize("general", [(), ("t4",)])
def test_gks_forward_is_the_routed_mixture_minus_the_general_mean(tiny_model_dir, arrow_lib, general):
    """Σ_i c_i (ΔW_i − ΔW̄) = Σ_i c_i ΔW_i − ΔW̄ because a token's weights sum to 1: every general
    adapter gets −1/G on top of Arrow's top-k weights, and the model's output is that mixture's
    (fast path equal to the fused layer's plain reference loop)."""
    fused = fused_with(tiny_model_dir, arrow_lib)
    router = ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2, gks=True, general=general))
    module = "model.layers.1.mlp.up_proj"
    x = torch.randn(2, 3, fused.layers[module].base.in_features)
    C = router.gate(module, x, None)
    names = list(fused.adapters)
    subtract = [names.index(g) for g in general] or list(range(len(names)))
    routed = [k for k, n in enumerate(names) if n not in general]
    decision = C.clone()
    decision[..., subtract] += 1.0 / len(subtract)
    assert torch.allclose(decision[..., routed].sum(-1), torch.ones(2, 3), atol=1e-6)  # Arrow's own top-k weights
    assert int((decision[..., routed] > 0).sum(-1).max()) == 2
    tok = fused.base.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad(), fused.mixture(router.layer_mixture()):
        ours = fused.base.model(input_ids=ids).logits
    with torch.no_grad(), fused.mixture(router.layer_mixture(), reference=True):
        reference = fused.base.model(input_ids=ids).logits
    with torch.no_grad(), fused.mixture(ArrowRouter(fused, arrow_lib, ArrowConfig(top_k=2)).layer_mixture()):
        plain = fused.base.model(input_ids=ids).logits
    assert float((ours - reference).abs().max()) <= 1e-4
    assert float((ours - plain).abs().max()) > 1e-3  # the subtraction changes the output
    r = router.route(["one two three"])[0]
    assert "general knowledge subtracted" in r.reason and min(r.probabilities.values()) >= 0


def test_gks_options_are_checked(tiny_model_dir, arrow_lib):
    fused = fused_with(tiny_model_dir, arrow_lib, ["t0", "t1"])
    with pytest.raises(LoramuxError, match="only with gks=True"):
        ArrowConfig(general=("t1",))
    with pytest.raises(LoramuxError, match="use prototype='svd'"):
        ArrowConfig(gks=True, prototype="power")
    with pytest.raises(LoramuxError, match=r"general adapters \['t4'\] are not loaded"):
        ArrowRouter(fused, arrow_lib, ArrowConfig(gks=True, general=("t4",)))
    with pytest.raises(LoramuxError, match=r"\['t1'\] cannot also be routing candidates"):
        ArrowRouter(fused, arrow_lib, ArrowConfig(gks=True, general=("t1",), candidates=("t0", "t1")))
