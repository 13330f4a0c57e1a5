import pytest

from loramux.data import Example, Task
from loramux.evaluation import MixtureScorer, compare_policies, score_task
from loramux.fusion import FusedModel
from loramux.library import Library
from loramux.models import load_base

from ..library.conftest import make_peft_dir

MC = Task("mc", tuple(Example(prompt=p, targets=("yes",), choices=("yes", "no", "maybe"), choice_scores=(1, 0, 0))
                      for p in ["one two", "The quick brown fox", "three", "x y z", "Question: which one?"]),
          "multiple_choice")
GEN = Task("gen", tuple(Example(prompt=p, targets=(t,)) for p, t in
                        [("one", "two"), ("four", "five six seven"), ("abc", "d")]), "generative")


@pytest.fixture
def lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for i, name in enumerate(["a", "b"]):
        lib.add(name, make_peft_dir(tiny_base, tmp_path / name, r=4, seed=i + 3), base=tiny_base, tasks=[name])
    return lib


@pytest.fixture
def scorer(tiny_model_dir, lib):
    fused = FusedModel(load_base(str(tiny_model_dir)))
    for name in ("a", "b"):
        fused.load(lib, name)
    return MixtureScorer(fused, batch_size=2, progress=False)


def test_each_example_scores_as_under_peft_with_its_own_adapter(scorer, tiny_model_dir, lib):
    mixtures = [{"a": 1.0}, None, {"b": 1.0}, {"a": 1.0}, None]
    got = scorer.score(MC, mixtures)
    for name in ("a", "b", None):
        base = load_base(str(tiny_model_dir))
        model = lib.load_peft(base, name) if name else base.model
        ref = score_task(model, base.tokenizer, MC, progress=False).predictions
        for j, mix in enumerate(mixtures):
            if (mix and list(mix)[0]) == name or (mix is None and name is None):
                assert got[j].choice_logprobs == pytest.approx(ref[j].choice_logprobs, abs=1e-4)
                assert got[j].prediction == ref[j].prediction


def test_memo_scores_each_example_and_mixture_once(scorer):
    scorer.score(MC, [{"a": 1.0}] * 5)
    groups = scorer.forward_groups
    again = scorer.score(MC, [{"a": 1.0}] * 5)
    assert scorer.forward_groups == groups and len(again) == 5
    scorer.score(MC, [{"a": 0.5, "b": 0.5}] * 2, indices=[3, 4])
    assert scorer.forward_groups == groups + 1


def test_generation_budget_does_not_depend_on_the_group(scorer):
    whole = scorer.score(GEN, [{"a": 1.0}] * 3)
    fresh = MixtureScorer(scorer.fused, progress=False)
    alone = fresh.score(GEN, [{"a": 1.0}], indices=[2])  # the shortest reference alone
    assert alone[0].prediction == whole[2].prediction


def test_compare_policies(scorer):
    out = compare_policies(scorer, [MC], {"base": lambda t, idx: [None] * len(idx),
                                          "oracle": lambda t, idx: [{"a": 1.0}] * len(idx)})
    assert set(out) == {"base", "oracle"} and 0 <= out["oracle"]["average"] <= 1
    assert out["base"]["per_task"]["mc"] == out["base"]["average"]


@pytest.fixture
def mole_fused(tiny_model_dir, tmp_path, tiny_base):
    """A fused model with three adapters on q, v and down projections (MoLE's gated units)."""
    from ..routers.gating.test_mole import NAMES, fused_for

    lib = Library(tmp_path / "mlib", create=True)
    for i, n in enumerate(NAMES):
        lib.add(n, make_peft_dir(tiny_base, tmp_path / f"m{n}", targets=("q_proj", "v_proj", "down_proj"), seed=i),
                base=tiny_base, tasks=[f"task_{n}"])
    return fused_for(tiny_model_dir, lib)


def test_mole_choice_scores_use_each_prompts_gate_weights(mole_fused):
    import torch

    from loramux.data import PromptFormatter
    from loramux.fusion import LayerMixture

    from ..routers.gating.test_mole import router_for

    fused = mole_fused
    router = router_for(fused, "block")
    got = MixtureScorer(fused, batch_size=3, progress=False).score(MC, [router] * len(MC.examples))
    f = PromptFormatter(fused.base.tokenizer)
    for ex, pred in zip(MC.examples, got):
        p = f.encode_prompt(ex.prompt)
        with torch.no_grad():
            w = router.route_weights(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        fixed = LayerMixture(lambda name, x, m: w[router.gates.unit[name]])  # the prompt's weights, frozen
        expected = []
        for c in ex.choices:
            a = f.encode_answer(c)
            with torch.no_grad(), fused.mixture(fixed):
                logp = torch.log_softmax(fused.base.model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
            expected.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)))
        assert pred.choice_logprobs == pytest.approx(expected, abs=1e-4)


def test_mole_generation_scores_through_the_engine(mole_fused):
    from ..routers.gating.test_mole import router_for

    fused = mole_fused
    router = router_for(fused, "layer")
    preds = MixtureScorer(fused, progress=False).score(GEN, [router] * 3)
    from loramux.engine import Engine, GenerationRequest, SamplingParams
    from loramux.evaluation import answer_budget

    engine = Engine(fused.base, fused=fused)
    budget = answer_budget(fused.base.tokenizer, GEN.examples)
    alone = [engine.generate([GenerationRequest(ex.prompt, sampling=SamplingParams(max_new_tokens=budget))],
                             router=router)[0].text.strip() for ex in GEN.examples]
    assert [p.prediction for p in preds] == alone  # batched scoring = each prompt alone


def _scorer(tiny_model_dir, lib, cache_dir, names=("a", "b"), **load):
    fused = FusedModel(load_base(str(tiny_model_dir), **load))
    for name in names:
        fused.load(lib, name)
    return MixtureScorer(fused, batch_size=2, progress=False, cache_dir=cache_dir)


def test_disk_cache_is_read_back_by_a_later_scorer_without_scoring(tiny_model_dir, lib, tmp_path, monkeypatch):
    mixtures = [{"a": 1.0}, None, {"b": 1.0}, {"a": 0.5, "b": 0.5}, None]
    first = _scorer(tiny_model_dir, lib, tmp_path / "cache").score(MC, mixtures)
    [file] = (tmp_path / "cache").glob("*.jsonl")
    assert len(file.read_text().splitlines()) == 5

    import loramux.evaluation.composite as composite

    monkeypatch.setattr(composite, "score_task", lambda *a, **k: pytest.fail("scored again instead of read back"))
    later = _scorer(tiny_model_dir, lib, tmp_path / "cache")
    again = later.score(MC, mixtures)
    assert later.from_disk == 5 and later.forward_groups == 0
    assert [p.prediction for p in again] == [p.prediction for p in first]
    assert [p.choice_logprobs for p in again] == [p.choice_logprobs for p in first]
    assert again[0].targets == first[0].targets and isinstance(again[0].targets, tuple)


def test_disk_cache_misses_when_an_adapter_or_the_task_changes(tiny_model_dir, lib, tiny_base, tmp_path):
    _scorer(tiny_model_dir, lib, tmp_path / "cache").score(MC, [{"a": 1.0}] * 5)
    lib.add("a", make_peft_dir(tiny_base, tmp_path / "a2", r=4, seed=99), base=tiny_base, tasks=["a"], replace=True)
    other = _scorer(tiny_model_dir, lib, tmp_path / "cache")
    other.score(MC, [{"a": 1.0}] * 5)
    assert other.from_disk == 0 and len(list((tmp_path / "cache").glob("*.jsonl"))) == 2  # new weights: a new file

    edited = Task("mc", MC.examples[:4] + (Example(prompt="changed", targets=("no",), choices=("yes", "no", "maybe"),
                                                      choice_scores=(0, 1, 0)),), "multiple_choice")
    third = _scorer(tiny_model_dir, lib, tmp_path / "cache")
    third.score(edited, [{"a": 1.0}] * 5)
    assert third.from_disk == 0  # same name, other examples: not the same task


def test_disk_cache_misses_when_the_base_numerics_change(tiny_model_dir, lib, tmp_path):
    """bf16, fp32 and an int8 base share a fingerprint (an adapter applies to all three), not predictions."""
    for load in ({}, {"dtype": "bfloat16"}, {"quantize": "int8"}):
        scorer = _scorer(tiny_model_dir, lib, tmp_path / "cache", **load)
        scorer.score(MC, [{"a": 1.0}] * 5)
        assert scorer.from_disk == 0
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 3


def test_disk_cache_skips_a_line_cut_short_and_adapters_without_identity(tiny_model_dir, lib, tiny_base, tmp_path):
    _scorer(tiny_model_dir, lib, tmp_path / "cache").score(MC, [None] * 5)
    [file] = (tmp_path / "cache").glob("*.jsonl")
    lines = file.read_text().splitlines()
    file.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a crash mid-write
    later = _scorer(tiny_model_dir, lib, tmp_path / "cache")
    later.score(MC, [None] * 5)
    assert later.from_disk == 4 and later.forward_groups == 1

    from loramux.library.checks import read_peft_dir

    loose = _scorer(tiny_model_dir, lib, tmp_path / "cache2", names=())
    loose.fused.add_adapter("c", read_peft_dir(make_peft_dir(tiny_base, tmp_path / "c", r=4, seed=5)))
    loose.score(MC, [{"c": 1.0}] * 5)  # weights with no identity: nothing persisted
    assert not (tmp_path / "cache2").exists()
