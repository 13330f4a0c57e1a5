"""A library that names a general adapter: every router's abstained prompts are served by it, not
by the base model alone, and the echo says so (library.py, routers/abstention.py)."""

import pytest
from fastapi.testclient import TestClient

from loramux.data import load_tasks
from loramux.engine import Engine
from loramux.models import load_base
from loramux.routers.gating import MoleTrainConfig, train_mole
from loramux.routers.sentence import DlpTrainConfig, train_dlp
from loramux.server import ServerConfig, create_app

from ..library.conftest import make_peft_dir
from ..routers.sentence.conftest import WORDS, bert_dir, task_dir, task_lib, task_prompts  # noqa: F401 (fixtures)
from ..routers.sentence.test_abstain import CONFIG, OUTSIDE


@pytest.fixture
def where():
    """Routing does not depend on the model's dtype: these tests run once, CPU fp32."""
    from ..conftest import Where

    return Where("cpu", "float32")


@pytest.fixture
def general_server(tiny_model_dir, tiny_base, task_lib, task_dir, bert_dir, tmp_path):
    task_lib.add("general", make_peft_dir(tiny_base, tmp_path / "general", seed=11, r=8), base=tiny_base)
    task_lib.set_general("general")
    config = DlpTrainConfig(**{**CONFIG.__dict__, "encoder": str(bert_dir)})
    router = train_dlp(task_lib, load_tasks(task_dir, split="train"), config, progress=False, log=lambda s: None)
    assert router.adapters == sorted(WORDS)  # the general adapter is never a class
    router.save(task_lib)
    engine = Engine(load_base(str(tiny_model_dir)), task_lib)
    for n in task_lib.routable():  # the gates are trained over the routed adapters alone
        engine.load(n)
    train_mole(engine.fused, load_tasks(task_dir, split="train"), MoleTrainConfig(steps=2, batch_size=4),
               progress=False, log=lambda s: None).save(task_lib)
    engine.load("general")
    inside = next(p for p in task_prompts("colors", 10, offset=1) if not router.out_of_library([p])[0])
    with TestClient(create_app(engine, task_lib, ServerConfig(admin_keys=frozenset({"adm"})))) as c:
        c.library = task_lib
        yield c, inside


@pytest.mark.parametrize("model", ["dlp", "arrow", "mole"])
def test_abstained_prompts_go_to_the_general_adapter(general_server, model):
    c, inside = general_server
    body = {"prompt": OUTSIDE[0], "max_tokens": 4, "temperature": 0}
    alone = c.post("/v1/completions", json={"model": "general", **body, "echo": True, "logprobs": 0}).json()
    base = c.post("/v1/completions", json={"model": "base", **body, "echo": True, "logprobs": 0}).json()
    r = c.post("/v1/completions", json={"model": model, **body, "echo": True, "logprobs": 0,
                                        "loramux": {"explain": True}})
    assert r.status_code == 200, r.text
    echo = r.json()["loramux"]
    assert echo["abstained"] is True and echo["general"] == "general" and echo["mixture"] == {"general": 1.0}
    assert echo["explain"]["general"] == "general" and "no adapter fits" in echo["reason"]
    served = r.json()["choices"][0]
    assert served["text"] == alone["choices"][0]["text"]  # served by it
    scores = [lp["logprobs"]["token_logprobs"][1:] for lp in (served, alone["choices"][0], base["choices"][0])]
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
    assert scores[1] != pytest.approx(scores[2], abs=1e-2)  # which is not the base model
    preview = c.post("/v1/loramux/route", json={"model": model, "prompt": OUTSIDE[0]}).json()
    assert preview["abstained"] is True and preview["general"] == "general"
    # a prompt an adapter fits is routed as before, never to the general adapter
    r = c.post("/v1/completions", json={"model": model, "prompt": inside, "max_tokens": 4, "temperature": 0,
                                        "loramux": {"explain": True}})
    echo = r.json()["loramux"]
    assert r.status_code == 200 and not echo.get("abstained") and "general" not in (echo["mixture"] or {})
    assert echo["explain"]["probabilities"].get("general", 0.0) == 0.0


def test_the_library_view_names_the_general_adapter(general_server):
    c, _ = general_server
    view = c.get("/v1/loramux/library").json()
    assert view["general"] == "general" and "general" in [a["name"] for a in view["adapters"]]


def test_a_general_adapter_set_or_unloaded_while_serving(general_server, tiny_base, tmp_path):
    c, _ = general_server
    body = {"prompt": OUTSIDE[0], "max_tokens": 0, "echo": True, "logprobs": 0}
    for model in ("dlp", "arrow"):  # routers built before the change
        assert c.post("/v1/completions", json={"model": model, **body}).json()["loramux"]["general"] == "general"
    c.library.set_general(None)  # `loramux library general --unset` beside the running server
    # the DLP router and the gates were trained without it: with it routable again, they are stale
    # until retrained, and Arrow routes to it too (the stale test is not put in front)
    for model in ("dlp", "mole"):
        r = c.post("/v1/completions", json={"model": model, **body})
        assert r.status_code == 404 and "added ['general']" in r.json()["error"]["message"]
    r = c.post("/v1/loramux/route", json={"model": "arrow", "prompt": OUTSIDE[0]}).json()
    assert not r["abstained"] and r["probabilities"]["general"] > 0
    c.library.set_general("general")
    assert c.delete("/v1/adapters/general", headers={"X-Admin-Key": "adm"}).status_code == 200
    base = c.post("/v1/completions", json={"model": "base", **body}).json()
    for model in ("dlp", "arrow"):  # its abstentions go to the base model, and say why
        r = c.post("/v1/completions", json={"model": model, **body, "loramux": {"explain": True}})
        assert r.status_code == 200, r.text
        echo = r.json()["loramux"]
        assert echo["abstained"] is True and echo["mixture"] is None and "'general' is not loaded" in echo["reason"]
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
            base["choices"][0]["logprobs"]["token_logprobs"][1:], abs=1e-4)
