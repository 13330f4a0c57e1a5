"""Arrow and MoLE through the server behind the library's DLP out-of-library test: a prompt the
test rejects is served by the base model and says so; `loramux.abstain: false` turns it off."""

import json

import pytest
from fastapi.testclient import TestClient

from loramux.data import load_tasks
from loramux.engine import Engine
from loramux.models import load_base
from loramux.routers.gating import MoleTrainConfig, train_mole
from loramux.routers.sentence import DlpTrainConfig, train_dlp
from loramux.server import ServerConfig, create_app

from ..routers.sentence.conftest import WORDS, bert_dir, task_dir, task_lib, task_prompts  # noqa: F401 (fixtures)
from ..routers.sentence.test_abstain import CONFIG, OUTSIDE


@pytest.fixture
def where():
    """The gate's decision does not depend on the model's dtype: these tests run once, CPU fp32."""
    from ..conftest import Where

    return Where("cpu", "float32")


@pytest.fixture
def gated_server(tiny_model_dir, task_lib, task_dir, bert_dir):
    config = DlpTrainConfig(**{**CONFIG.__dict__, "encoder": str(bert_dir)})
    router = train_dlp(task_lib, load_tasks(task_dir, split="train"), config, progress=False, log=lambda s: None)
    router.save(task_lib)
    engine = Engine(load_base(str(tiny_model_dir)), task_lib)
    for n in task_lib.names():
        engine.load(n)
    train_mole(engine.fused, load_tasks(task_dir, split="train"), MoleTrainConfig(steps=2, batch_size=4),
               progress=False, log=lambda s: None).save(task_lib)
    inside = next(p for p in task_prompts("colors", 10, offset=1) if not router.out_of_library([p])[0])
    with TestClient(create_app(engine, task_lib, ServerConfig())) as c:
        yield c, inside


def test_arrow_abstains_where_no_adapter_fits(gated_server):
    c, inside = gated_server
    outside = OUTSIDE[0]
    base = c.post("/v1/completions", json={"model": "base", "prompt": outside, "max_tokens": 4, "temperature": 0})
    r = c.post("/v1/completions", json={"model": "arrow", "prompt": [outside, inside], "max_tokens": 4,
                                        "temperature": 0, "loramux": {"explain": True}})
    assert r.status_code == 200, r.text
    (out, served), echo = r.json()["choices"], r.json()["loramux"]  # the response's echo is the first prompt's
    assert out["text"] == base.json()["choices"][0]["text"] and out["loramux"] == echo
    assert served["loramux"]["router"] == "arrow" and not served["loramux"].get("abstained")  # each its own
    assert echo["router"] == "arrow" and echo["abstained"] is True and echo["mixture"] is None
    assert "no adapter fits" in echo["reason"] and "in front of arrow" in echo["reason"]
    r = c.post("/v1/completions", json={"model": "arrow", "prompt": inside, "max_tokens": 4, "temperature": 0,
                                        "loramux": {"explain": True}})
    echo = r.json()["loramux"]
    assert r.json()["choices"][0]["text"] == served["text"]  # the other prompt went to Arrow, alone or not
    assert echo["router"] == "arrow" and not echo.get("abstained") and echo["explain"]["granularity"] == "token"
    r = c.post("/v1/completions", json={"model": "arrow", "prompt": outside, "max_tokens": 4, "temperature": 0,
                                        "loramux": {"abstain": False, "explain": True}})
    assert r.status_code == 200 and not r.json()["loramux"].get("abstained")
    assert r.json()["loramux"]["explain"]["granularity"] == "token"  # routed by Arrow after all
    r = c.post("/v1/completions", json={"model": "arrow", "prompt": outside, "loramux": {"top_p": 0.5}})
    assert r.status_code == 400 and "apply to dlp" in r.json()["error"]["message"]


def test_route_preview_and_scoring_behind_the_test(gated_server):
    c, inside = gated_server
    r = c.post("/v1/loramux/route", json={"model": "arrow", "prompt": OUTSIDE[1]})
    assert r.status_code == 200 and r.json()["abstained"] is True and "in front of arrow" in r.json()["reason"]
    r = c.post("/v1/loramux/route", json={"model": "arrow", "prompt": inside})
    assert r.status_code == 200 and not r.json()["abstained"] and r.json()["layers"]
    base = c.post("/v1/completions", json={"model": "base", "prompt": OUTSIDE[1], "max_tokens": 0, "echo": True,
                                           "logprobs": 0}).json()
    gated = c.post("/v1/completions", json={"model": "arrow", "prompt": OUTSIDE[1], "max_tokens": 0, "echo": True,
                                            "logprobs": 0}).json()
    assert gated["choices"][0]["logprobs"] == base["choices"][0]["logprobs"]  # the base model scored it
    assert gated["loramux"]["abstained"] is True



def test_mole_and_streaming_behind_the_test(gated_server):
    c, inside = gated_server
    base = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": OUTSIDE[2]}],
                                                "max_tokens": 4, "temperature": 0}).json()
    with c.stream("POST", "/v1/chat/completions", json={"model": "mole", "stream": True, "max_tokens": 4,
                                                        "temperature": 0, "messages": [{"role": "user",
                                                                                        "content": OUTSIDE[2]}]}) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln and ln != "data: [DONE]"]
    assert chunks[0]["loramux"]["router"] == "mole" and chunks[0]["loramux"]["abstained"] is True
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == base["choices"][0]["message"]["content"]  # the base model answered it
    r = c.post("/v1/chat/completions", json={"model": "mole", "max_tokens": 3, "n": 2, "temperature": 0,
                                             "messages": [{"role": "user", "content": inside}]})
    assert r.status_code == 200 and r.json()["loramux"]["router"] == "mole"
    assert not r.json()["loramux"].get("abstained") and len(r.json()["choices"]) == 2
