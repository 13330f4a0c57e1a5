import pytest
import torch

from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.engine.sampling import top_p_filter
from loramux.errors import LoramuxError
from loramux.library import Library
from loramux.models import load_base

from ..library.conftest import make_peft_dir

PROMPTS = ["one two three", "The quick brown fox jumps over the lazy dog", "x"]


@pytest.fixture
def lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for i, (name, targets, r) in enumerate([("a", ("q_proj", "v_proj"), 4), ("b", ("o_proj", "down_proj"), 2),
                                            ("c", ("gate_proj", "up_proj", "k_proj", "q_proj"), 8)]):
        lib.add(name, make_peft_dir(tiny_base, tmp_path / name, targets=targets, r=r, seed=i + 1), base=tiny_base)
    return lib


@pytest.fixture
def engine(tiny_model_dir, lib):
    e = Engine(load_base(str(tiny_model_dir)), lib)
    for name in ("a", "b", "c"):
        e.load(name)
    return e


def greedy(prompt, mixture=None, n=8, **kw):
    return GenerationRequest(prompt, mixture, SamplingParams(max_new_tokens=n, **kw))


def test_greedy_single_adapter_equals_peft_generate(engine, tiny_model_dir, lib):
    from peft import PeftModel

    base = load_base(str(tiny_model_dir))
    peft = PeftModel.from_pretrained(base.model, lib.adapter_dir("c")).eval()
    ours = engine.generate([greedy(p, {"c": 1.0}, n=10) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, ours):
        ids = torch.tensor([engine.formatter.encode_prompt(prompt)], device=peft.device)
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                eos_token_id=sorted(engine.stop_ids), pad_token_id=base.tokenizer.pad_token_id)
        reference = [t for t in out[0, ids.shape[1]:].tolist() if t not in engine.stop_ids]
        assert result.token_ids == reference


def test_each_row_of_a_mixed_batch_equals_the_row_alone(engine):
    requests = [greedy(PROMPTS[0], {"a": 0.5, "b": 0.5}), greedy(PROMPTS[1], None),
                greedy(PROMPTS[2], {"c": 1.0, "a": -0.3}), greedy(PROMPTS[1], {"b": 1.0}, n=3)]
    batched = engine.generate(requests)
    for req, res in zip(requests, batched):
        alone = engine.generate([req])[0]
        assert res.token_ids == alone.token_ids and res.text == alone.text
        assert res.mixture == req.mixture
    assert len(batched[3].token_ids) == 3 and batched[3].finish_reason == "length"


def test_folding_a_shared_mixture_changes_no_token(engine, tiny_model_dir, lib):
    assert engine.fold  # the default: a mixture the whole batch shares is folded for the call
    unfolded = Engine(load_base(str(tiny_model_dir)), lib, fold=False)
    for name in ("a", "b", "c"):
        unfolded.load(name)
    requests = [greedy(p, {"a": 0.6, "c": 0.4}, n=10) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(requests)] == [r.token_ids for r in unfolded.generate(requests)]
    assert all(layer._folded is None for layer in engine.fused.layers.values())  # copies freed afterwards


def test_base_rows_equal_the_plain_model(engine, tiny_model_dir):
    plain = Engine(load_base(str(tiny_model_dir)))
    assert engine.generate([greedy(PROMPTS[1])])[0].token_ids == plain.generate([greedy(PROMPTS[1])])[0].token_ids


def test_finished_rows_leave_the_batch(engine):
    sizes = []
    model = engine.base.model
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        engine.generate([greedy(PROMPTS[0], {"a": 1.0}, n=2), greedy(PROMPTS[1], {"b": 1.0}, n=5)])
    finally:
        hook.remove()
    assert sizes == [2, 2, 1, 1, 1]  # prefill, step with both rows, then the long row alone


def test_stop_strings_and_streaming(engine):
    full = engine.generate([greedy(PROMPTS[1], {"a": 1.0}, n=12)])[0].text
    assert len(full) > 4
    stop = full[2:4]
    deltas = []
    res = engine.generate([greedy(PROMPTS[1], {"a": 1.0}, n=12, stop=(stop,))], on_delta=lambda i, d: deltas.append(d))[0]
    assert res.text == full[: full.index(stop)] and res.finish_reason == "stop"
    assert "".join(deltas) == res.text
    assert "".join(engine.stream(greedy(PROMPTS[1], {"a": 1.0}, n=12))) == full


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    req = GenerationRequest(PROMPTS[0], {"a": 1.0}, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7))
    alone = engine.generate([req])[0].token_ids
    with_others = engine.generate([greedy(PROMPTS[1], {"b": 1.0}), req])[1].token_ids
    assert alone == with_others
    other_seed = GenerationRequest(PROMPTS[0], {"a": 1.0}, SamplingParams(max_new_tokens=10, temperature=1.0, seed=8))
    assert engine.generate([other_seed])[0].token_ids != alone


def test_top_p_filter_keeps_the_smallest_nucleus():
    p = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert torch.allclose(top_p_filter(p, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(top_p_filter(p, 0.6), torch.tensor([0.0, 0.625, 0.375, 0.0]))
    assert torch.allclose(top_p_filter(p, 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # always at least one
    assert torch.equal(top_p_filter(p, 1.0), p)


@pytest.mark.parametrize("request_, match", [
    (greedy("hi", {"zzz": 1.0}), r"adapter 'zzz' is not loaded; loaded adapters: \['a', 'b', 'c'\]"),
    (greedy("hi", {"a": float("nan")}), "weight nan for adapter 'a' is not finite"),
    (greedy("hi", {}), "empty mixture"),
    (greedy("word " * 600, {"a": 1.0}), r"prompt of \d+ tokens \+ max_new_tokens 8 exceeds the model's context of 512"),
])
def test_bad_requests_fail_clearly_and_the_engine_keeps_serving(engine, request_, match):
    with pytest.raises(LoramuxError, match=match):
        engine.generate([greedy(PROMPTS[0], {"a": 1.0}), request_])
    assert engine.generate([greedy(PROMPTS[0], {"a": 1.0}, n=2)])[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(LoramuxError, match=match):
        SamplingParams(**kwargs)


def test_mixture_without_loaded_adapters(tiny_model_dir):
    with pytest.raises(LoramuxError, match="none are loaded"):
        Engine(load_base(str(tiny_model_dir))).generate([greedy("hi", {"a": 1.0})])


def test_engine_without_library_cannot_load(tiny_model_dir):
    with pytest.raises(LoramuxError, match="this engine has no library"):
        Engine(load_base(str(tiny_model_dir))).load("a")


class _FixedRouter:
    """Routes by a prompt's first word: a constructed case with a known answer."""

    def route(self, prompts):
        from loramux.routers import Routing

        table = {"one": (("a",), (1.0,)), "The": (("b", "c"), (0.7, 0.3))}
        out = []
        for p in prompts:
            adapters, weights = table.get(p.split()[0], ((), ()))
            out.append(Routing(adapters, weights, {"a": 0.5}, abstained=not adapters, router="fixed"))
        return out


def test_router_routes_each_row_and_results_carry_the_routing(engine):
    requests = [greedy(p) for p in PROMPTS] + [greedy("one two", {"b": 1.0})]
    routed = engine.generate(requests, router=_FixedRouter())
    assert [r.mixture for r in routed] == [{"a": 1.0}, {"b": 0.7, "c": 0.3}, None, {"b": 1.0}]
    assert routed[0].routing.router == "fixed" and routed[2].routing.abstained and routed[3].routing is None
    explicit = engine.generate([greedy(p, m) for p, m in zip(PROMPTS, [{"a": 1.0}, {"b": 0.7, "c": 0.3}, None])])
    assert [r.token_ids for r in routed[:3]] == [r.token_ids for r in explicit]


def test_route_loads_chosen_adapters_on_demand(tiny_model_dir, lib):
    e = Engine(load_base(str(tiny_model_dir)), lib)
    [result] = e.generate([greedy("one two")], router=_FixedRouter())
    assert e.adapters == ["a"] and result.mixture == {"a": 1.0}


def test_request_with_conflicting_mixture_and_routing():
    from loramux.routers import Routing

    with pytest.raises(LoramuxError, match="both a mixture"):
        GenerationRequest("x", {"a": 1.0}, routing=Routing(("b",), (1.0,)))


def test_arrow_in_the_engine_equals_a_forward_with_its_gate(engine, lib, where):
    from loramux.routers.arrow import ArrowConfig, ArrowRouter

    router = ArrowRouter(engine.fused, lib, ArrowConfig(top_k=2))
    results = engine.generate([greedy(p, n=6) for p in PROMPTS], router=router)
    for prompt, result in zip(PROMPTS, results):
        assert result.routing.router == "arrow" and result.mixture is None
        ids = list(engine.formatter.encode_prompt(prompt))
        for token in result.token_ids:  # greedy, one token at a time, no cache, Arrow's gate active
            with torch.no_grad(), engine.fused.mixture(router.layer_mixture()):
                logits = engine.base.model(input_ids=torch.tensor([ids], device=engine.base.model.device)).logits[0, -1]
            # bf16: a cached step and a full forward round differently; the token is (near) the top
            assert logits[token] >= logits.max() - where.tol(0.0)
            ids.append(token)
    with pytest.raises(LoramuxError, match=r"requests \[0\] carry a mixture, but a per-token router"):
        engine.generate([greedy("x", {"a": 1.0})], router=router)
