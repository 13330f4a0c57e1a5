"""The DLP router's stored out-of-library test, and retraining it for a grown library."""

import pytest
import torch

from loramux.data import load_tasks
from loramux.library import Library
from loramux.routers.sentence import Abstain, DlpRouter, DlpTrainConfig, energy, train_dlp

from ...library.conftest import make_peft_dir
from .conftest import WORDS, task_prompts


@pytest.fixture
def where():
    """Router training and routing do not depend on the model's dtype: these tests run once, CPU fp32."""
    from ...conftest import Where

    return Where("cpu", "float32")


CONFIG = DlpTrainConfig(hidden=(64,), max_epochs=60, patience=10, lr=3e-3, batch_size=16, formats=("own",),
                        abstain_recall=0.9, val_fraction=0.25)
OUTSIDE = ["hello world zebra quantum", "quantum quantum hello", "zebra world"]


def train(lib, task_dir, bert_dir, **kw):
    return train_dlp(lib, load_tasks(task_dir, split="train"), DlpTrainConfig(**{**CONFIG.__dict__, "encoder": str(bert_dir)}),
                     progress=False, log=lambda s: None, **kw)


def test_threshold_from_validation_prompts_stored_and_applied(task_lib, task_dir, bert_dir):
    router = train(task_lib, task_dir, bert_dir)
    a = router.abstain
    assert a.score == "energy" and a.recall == 0.9 and a.n_val == 30  # ceil(0.25 * 40) prompts of each of 3 tasks
    assert sorted(a.per_adapter) == sorted(WORDS)
    inside = [p for t in WORDS for p in task_prompts(t, 10, offset=1)]
    routed = router.route(inside + OUTSIDE)
    kept = [not r.abstained for r in routed[:len(inside)]]
    assert sum(kept) >= 0.7 * len(inside)  # each adapter's threshold comes from about 10 validation prompts
    assert all(r.abstained and r.mixture is None and "no adapter fits: energy" in r.reason for r in routed[len(inside):])
    assert not any(r.abstained for r in router.route(OUTSIDE, abstain=False))  # per call: off
    logits, _ = router.logits(OUTSIDE)
    assert bool((energy(logits) > a.threshold).all())
    router.save(task_lib)
    loaded = DlpRouter.load(task_lib)
    assert loaded.abstain == a and [r.abstained for r in loaded.route(OUTSIDE)] == [True] * 3


def test_decide_uses_given_energies_only():
    router = DlpRouter.__new__(DlpRouter)
    router.adapters, router.abstain, router.kind = ["x", "y"], Abstain("energy", 0.0, 0.95, 10), "dlp"
    from loramux.routers.sentence import DlpConfig

    router.config = DlpConfig()
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    out = router.decide(probs, energies=torch.tensor([0.5, -0.5]))
    assert [r.abstained for r in out] == [True, False]
    # each adapter's own threshold, the global one where an adapter has none
    router.abstain = Abstain("energy", 0.0, 0.95, 10, {"x": 1.0})
    out = router.decide(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), energies=torch.tensor([0.5, 0.5]))
    assert [r.abstained for r in out] == [False, True] and "'y'" in out[1].reason
    assert not any(r.abstained for r in router.decide(probs))  # constructed probabilities: no energies, no test
    with pytest.raises(Exception, match="abstain test"):
        Abstain("msp", 0.1, 0.95, 10)


def test_growing_the_library_retrains_the_head_from_cached_embeddings(tiny_base, task_dir, bert_dir, tmp_path,
                                                                      monkeypatch):
    lib = Library(tmp_path / "lib", create=True)
    for i, task in enumerate(["animals", "colors"]):
        lib.add(task, make_peft_dir(tiny_base, tmp_path / task, seed=i), base=tiny_base, tasks=[task])
    old = train(lib, task_dir, bert_dir)
    old.save(lib)
    lib.add("numbers", make_peft_dir(tiny_base, tmp_path / "numbers", seed=9), base=tiny_base, tasks=["numbers"])
    previous = DlpRouter.load(lib, adapters_may_differ=True)  # refused without: the library changed
    encoded = []
    real = previous.encoder.encode
    monkeypatch.setattr(previous.encoder, "encode", lambda texts, **kw: encoded.extend(texts) or real(texts, **kw))
    grown = train(lib, task_dir, bert_dir, previous=previous)
    assert grown.info["warm_start"] and grown.adapters == ["animals", "colors", "numbers"]
    assert encoded and all(t.split()[0] in WORDS["numbers"] for t in encoded)  # only the new task's prompts
    assert [r.adapters[0] for r in grown.route(task_prompts("numbers", 5, offset=1), abstain=False)] == ["numbers"] * 5
    kept_rows = grown.head.net[-1].weight
    assert kept_rows.shape[0] == 3


def test_a_router_stored_before_abstention_loads_without_it(task_lib, task_dir, bert_dir):
    """router.json of an older loramux: no `abstain` entry, no `selection.abstain`: it routes as before."""
    import json
    import shutil

    d = train(task_lib, task_dir, bert_dir).save(task_lib)

    def write(target):
        for f in d.iterdir():
            shutil.copy(f, target / f.name)
        meta = json.loads((target / "router.json").read_text())
        del meta["abstain"], meta["selection"]["abstain"]
        (target / "router.json").write_text(json.dumps(meta))

    task_lib.save_router("dlp", "dlp", task_lib.names(), write)
    old = DlpRouter.load(task_lib)
    assert old.abstain is None and old.config.abstain
    assert not any(r.abstained for r in old.route(OUTSIDE))
