import json

import pytest
import torch

from loramux.data import load_tasks
from loramux.errors import LoramuxError
from loramux.routers import load_router
from loramux.routers.sentence import DlpConfig, DlpRouter, DlpTrainConfig, MlpHead, encode_cached, load_encoder, train_dlp

from ...library.conftest import make_peft_dir
from .conftest import WORDS, task_prompts

# The tasks' own format and no stored abstain test: these tests check routing and selection exactly
# (test_abstain.py and test_formats.py cover the rest).
SMALL = DlpTrainConfig(hidden=(64,), max_epochs=60, patience=10, lr=3e-3, batch_size=16, formats=("own",),
                       abstain_recall=None)


@pytest.fixture
def trained(task_lib, task_dir, bert_dir):
    tasks = load_tasks(task_dir, split="train")
    return train_dlp(task_lib, tasks, DlpTrainConfig(**{**SMALL.__dict__, "encoder": str(bert_dir)}), progress=False,
                     log=lambda s: None)


def test_routes_each_held_out_prompt_to_its_task(trained):
    for k, task in enumerate(WORDS):
        routings = trained.route(task_prompts(task, 10, offset=1))
        assert [r.adapters[0] for r in routings] == [task] * 10
        for r in routings:
            assert r.weights[0] == pytest.approx(1.0 if len(r.adapters) == 1 else r.weights[0])
            assert set(r.probabilities) == set(WORDS) and sum(r.probabilities.values()) == pytest.approx(1.0)
            assert not r.abstained and r.router == "dlp"


def test_selection_on_constructed_probabilities(trained):
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.85, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    names = trained.adapters
    r = trained.decide(probs)  # default p = 0.6, renormalised
    assert r[0].adapters == (names[0], names[1]) and r[0].weights == pytest.approx((0.625, 0.375))
    assert r[1].adapters == (names[1],) and r[1].weights == (1.0,)
    assert r[2].adapters == (names[0], names[1])  # tie: lower index first
    r = trained.decide(probs, top_p=1.0, weighting="softmax")
    assert len(r[0].adapters) == 3 and sum(r[0].weights) == pytest.approx(1.0)
    assert r[0].weights[0] < 0.5  # the softmax over probabilities flattens
    assert trained.decide(probs, top_p=1.0, top_k=2)[2].adapters == (names[0], names[1])


def test_abstain_on_low_confidence(trained):
    probs = torch.tensor([[0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    r = trained.decide(probs, min_confidence=0.5)
    assert r[0].abstained and r[0].mixture is None and "0.400 < min_confidence 0.5" in r[0].reason
    assert not r[1].abstained and r[1].mixture == {trained.adapters[0]: 1.0}


def test_abstain_far_from_every_task(trained):
    inside = task_prompts("colors", 4)  # training prompts lie inside their adapter's radius by construction
    outside = ["hello world zebra quantum", "quantum quantum hello"]
    on = trained.route(inside + outside, max_distance="auto")
    assert [r.abstained for r in on] == [False] * 4 + [True] * 2
    assert "outside every adapter's training radius" in on[-1].reason
    assert not any(r.abstained for r in trained.route(outside))  # off by default: the classifier still picks one
    far = trained.route(outside, max_distance=0.0)
    assert all(r.abstained and "max_distance 0.0" in r.reason for r in far)


def test_save_load_round_trip(trained, task_lib):
    trained.save(task_lib)
    loaded = load_router(task_lib, "dlp")
    prompts = task_prompts("animals", 3) + task_prompts("numbers", 3)
    a, _ = trained.scores(prompts)
    b, _ = loaded.scores(prompts)
    assert torch.equal(a, b)
    assert loaded.adapters == trained.adapters and loaded.config == trained.config
    assert load_router(task_lib, "dlp", top_p=0.9).config.top_p == 0.9


def test_refuses_a_library_that_changed(trained, task_lib, tiny_base, tmp_path):
    trained.save(task_lib)
    task_lib.add("colors", make_peft_dir(tiny_base, tmp_path / "new", seed=7), base=tiny_base, tasks=["colors"],
                 replace=True)
    with pytest.raises(LoramuxError, match=r"library changed since \(removed \[\], replaced \['colors'\], added \[\]\)"):
        DlpRouter.load(task_lib)
    task_lib.add("extra", make_peft_dir(tiny_base, tmp_path / "x", seed=8), base=tiny_base, tasks=["extra"])
    with pytest.raises(LoramuxError, match=r"added \['extra'\]"):
        load_router(task_lib)


def test_router_files_are_safetensors_and_json(trained, task_lib):
    d = trained.save(task_lib)
    assert sorted(p.name for p in d.iterdir()) == ["router.json", "router.safetensors"]
    meta = json.loads((d / "router.json").read_text())
    assert meta["adapters"] == sorted(WORDS) and meta["kind"] == "dlp" and meta["selection"]["top_p"] == 0.6
    assert task_lib.verify() == []


def test_training_needs_each_adapters_task(task_lib, task_dir, bert_dir):
    tasks = [t for t in load_tasks(task_dir, split="train") if t.name != "colors"]
    with pytest.raises(LoramuxError, match="trained on task 'colors', which is not in the given data"):
        train_dlp(task_lib, tasks, DlpTrainConfig(encoder=str(bert_dir)), progress=False, log=lambda s: None)


def test_default_head_is_the_papers_size_class():
    head = MlpHead(384, 14)  # MiniLM's width, 14 adapters
    assert 4.5e6 < head.n_params < 5.5e6


def test_base_model_encoder_and_cache(tiny_base, tmp_path):
    enc = load_encoder("base:1", base=tiny_base)
    texts = ["one two three", "the quick brown fox", "one two three"]
    first = encode_cached(enc, texts, cache_dir=tmp_path)
    assert first.shape == (3, 32) and torch.allclose(first.norm(dim=-1), torch.ones(3))
    assert torch.equal(first[0], first[2])
    again = encode_cached(enc, texts[:2], cache_dir=tmp_path)  # served from the cache file
    assert torch.equal(again, first[:2])
    alone = enc.encode(["the quick brown fox"])  # padding inside a batch does not change an embedding
    assert torch.allclose(alone[0], first[1], atol=1e-5)


def test_hf_encoder_truncates_long_prompts_quietly(bert_dir, caplog, capfd):
    """A prompt longer than the encoder's window is embedded from its first max_length tokens,
    without transformers' "longer than the specified maximum sequence length" warning."""
    enc = load_encoder(str(bert_dir))
    assert enc.max_length == 64  # the tokenizer's model_max_length caps the default 256
    words = (WORDS["animals"] + WORDS["colors"]) * 6  # 96 words, 96 tokens with this word-level vocabulary
    long, head = " ".join(words), " ".join(words[:enc.max_length])
    emb = enc.encode([long, head])
    assert torch.allclose(emb[0], emb[1], atol=1e-6)
    said = caplog.text + capfd.readouterr().err  # transformers' logger propagates under pytest, else writes stderr
    assert "longer than the specified maximum" not in said


@pytest.mark.parametrize("spec, match", [("base:99", "layer must be in 0..2"), ("base:x", "must be an integer"),
                                         ("/no/such/dir", "not an HF model dir")])
def test_bad_encoder_specs(spec, match, tiny_base):
    with pytest.raises(LoramuxError, match=match):
        load_encoder(spec, base=tiny_base)


@pytest.mark.parametrize("kwargs, match", [({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
                                           ({"weighting": "avg"}, "weighting"), ({"min_confidence": 2}, "min_confidence"),
                                           ({"max_distance": "far"}, "max_distance"),
                                           ({"max_distance": float("nan")}, "max_distance")])
def test_bad_selection_config(kwargs, match):
    with pytest.raises(LoramuxError, match=match):
        DlpConfig(**kwargs)


def test_default_encoder_is_minilm_and_embeds_by_meaning():
    enc = load_encoder()
    assert enc.spec == "minilm" and enc.dim == 384
    x = enc.encode(["What will the weather be like tomorrow?", "Is it going to rain today?",
                    "Count the apples on the table."])
    assert torch.allclose(x.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(x[0] @ x[1]) > float(x[0] @ x[2]) + 0.2
