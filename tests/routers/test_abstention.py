"""The DLP out-of-library test in front of the in-forward routers (routers/abstention.py)."""

from types import SimpleNamespace

import pytest

from loramux.data import load_tasks
from loramux.routers.abstention import applies, screen, stored_test
from loramux.routers.sentence import DlpTrainConfig, train_dlp

from .sentence.conftest import WORDS, bert_dir, task_dir, task_lib, task_prompts  # noqa: F401 (fixtures)
from .sentence.test_abstain import CONFIG, OUTSIDE


@pytest.fixture
def where():
    """Router training and routing do not depend on the model's dtype: these tests run once, CPU fp32."""
    from ..conftest import Where

    return Where("cpu", "float32")


def train(lib, task_dir, bert_dir, **kw):
    config = DlpTrainConfig(**{**CONFIG.__dict__, "encoder": str(bert_dir), **kw})
    return train_dlp(lib, load_tasks(task_dir, split="train"), config, progress=False, log=lambda s: None)


def test_the_screen_abstains_where_the_dlp_router_would(task_lib, task_dir, bert_dir):
    router = train(task_lib, task_dir, bert_dir)
    prompts = [p for t in WORDS for p in task_prompts(t, 6, offset=1)] + OUTSIDE
    why = router.out_of_library(prompts)
    assert why == [r.reason if r.abstained else "" for r in router.route(prompts)]  # the same stored test
    assert all(why[-len(OUTSIDE):]) and sum(not w for w in why) >= 0.7 * (len(prompts) - len(OUTSIDE))
    mole = SimpleNamespace(kind="mole", fused=SimpleNamespace(adapters=sorted(WORDS)))  # an in-forward router
    routings = screen(router, prompts, mole)
    for w, r in zip(why, routings):
        assert (r is None) == (not w)
        if r is not None:  # served by the base model, and the echo says which test decided
            assert r.abstained and r.mixture is None and r.router == "mole"
            assert r.reason.startswith(w) and "dlp out-of-library test, in front of mole" in r.reason
    assert screen(None, prompts, mole) == [None] * len(prompts) and screen(router, [], mole) == []
    # a test set for other adapters (a library grown since): the in-forward router serves every prompt
    grown = SimpleNamespace(kind="arrow", fused=SimpleNamespace(adapters=[*sorted(WORDS), "new"]))
    assert not applies(router, grown) and screen(router, prompts, grown) == [None] * len(prompts)
    assert applies(router, mole) and not applies(None, mole)


def test_stored_test_only_with_a_stored_test(task_lib, task_dir, bert_dir):
    assert stored_test(task_lib) is None  # no router stored
    train(task_lib, task_dir, bert_dir, abstain_recall=None).save(task_lib)
    assert stored_test(task_lib) is None  # a router without an out-of-library test
    router = train(task_lib, task_dir, bert_dir)
    router.save(task_lib)
    test = stored_test(task_lib)
    assert test is not None and test.abstain == router.abstain
    assert test.out_of_library(OUTSIDE) == router.out_of_library(OUTSIDE)


def test_abstentions_go_to_the_librarys_general_adapter(task_lib, task_dir, bert_dir, tiny_base, tmp_path):
    from loramux.routers.sentence import DlpRouter

    from ..library.conftest import make_peft_dir

    train(task_lib, task_dir, bert_dir).save(task_lib)
    assert stored_test(task_lib).general == ""  # none named: the base model serves abstentions
    task_lib.add("general", make_peft_dir(tiny_base, tmp_path / "general", seed=9), base=tiny_base)
    task_lib.set_general("general")
    test = stored_test(task_lib)  # the router over the other adapters still loads
    assert test.general == "general" and isinstance(test, DlpRouter)
    fresh = train(task_lib, task_dir, bert_dir)  # trained now: no class for it, and it knows where to abstain to
    assert fresh.adapters == sorted(WORDS) and fresh.general == "general"
    (r,) = screen(test, [OUTSIDE[0]], SimpleNamespace(kind="arrow", candidates=sorted(WORDS)))
    assert r.abstained and r.mixture == {"general": 1.0} and r.served_by == "general adapter 'general'"
    assert r.to_dict()["general"] == "general"
    (d,) = test.route([OUTSIDE[0]])
    assert d.abstained and d.mixture == {"general": 1.0} and d.general == "general"
    routed = [x for x in test.route(task_prompts("colors", 6, offset=1)) if not x.abstained]
    assert routed and all("general" not in x.mixture and "general" not in x.probabilities for x in routed)
