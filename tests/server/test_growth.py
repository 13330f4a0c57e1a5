"""Growing the library under a running server: a new adapter is added over HTTP, the DLP router's
head is retrained for it from cached embeddings, and the server switches routers atomically while
it keeps answering routed requests."""

import pytest
import threading

import httpx

from loramux.data import load_tasks
from loramux.engine import Engine
from loramux.library import Library
from loramux.models import load_base
from loramux.routers.sentence import DlpRouter, DlpTrainConfig, train_dlp
from loramux.server import ServerConfig, create_app
from loramux.server.background import serve_in_background

from ..library.conftest import make_peft_dir
from ..routers.sentence.conftest import WORDS, bert_dir, task_dir, task_prompts  # noqa: F401 (fixtures)


@pytest.fixture
def where():
    """Router training and routing do not depend on the model's dtype: these tests run once, CPU fp32."""
    from ..conftest import Where

    return Where("cpu", "float32")


CONFIG = DlpTrainConfig(hidden=(64,), max_epochs=60, patience=10, lr=3e-3, batch_size=16, formats=("own",),
                        abstain_recall=None)


def test_a_new_adapter_and_its_router_update_while_the_server_answers(tiny_model_dir, tiny_base, task_dir,
                                                                     bert_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for i, task in enumerate(["animals", "colors"]):
        lib.add(task, make_peft_dir(tiny_base, tmp_path / task, seed=i), base=tiny_base, tasks=[task])
    config = DlpTrainConfig(**{**CONFIG.__dict__, "encoder": str(bert_dir)})
    tasks = load_tasks(task_dir, split="train")
    train_dlp(lib, tasks, config, progress=False, log=lambda s: None).save(lib)
    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    root = tmp_path / "uploads"
    app = create_app(engine, lib, ServerConfig(admin_keys=frozenset({"adm"}), adapter_root=str(root)))
    server, thread, url = serve_in_background(app)
    answers, stop, phase = [], threading.Event(), ["before"]

    def traffic():  # routed requests, one after another, for as long as the update takes
        prompts = [p for t in WORDS for p in task_prompts(t, 2, offset=1)]
        with httpx.Client(base_url=url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/completions", json={"model": "auto", "prompt": prompts[i % len(prompts)],
                                                     "max_tokens": 2, "temperature": 0,
                                                     "loramux": {"explain": True}})
                body = r.json()
                answers.append((phase[0], r.status_code, sorted(body.get("loramux", {}).get("explain", {})
                                                                .get("probabilities", {}))))
                i += 1

    client = threading.Thread(target=traffic)
    client.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            while len(answers) < 3:
                stop.wait(0.05)
            phase[0] = "adding"
            new = make_peft_dir(tiny_base, root / "numbers", seed=9)
            r = c.post("/v1/adapters", json={"name": "numbers", "path": str(new), "tasks": ["numbers"]},
                       headers={"X-Admin-Key": "adm"})
            assert r.status_code == 200, r.text
            assert lib.get("numbers").tasks == ("numbers",)
            phase[0] = "retraining"
            previous = DlpRouter.load(lib, adapters_may_differ=True)
            train_dlp(lib, tasks, config, progress=False, log=lambda s: None, previous=previous).save(lib)
            phase[0] = "after"
            while sum(1 for a in answers if a[0] == "after") < 3:
                stop.wait(0.05)
            r = c.post("/v1/completions", json={"model": "auto", "prompt": task_prompts("numbers", 1, offset=1)[0],
                                                 "max_tokens": 2, "temperature": 0, "loramux": {"explain": True}})
            assert r.status_code == 200 and r.json()["loramux"]["adapters"] == ["numbers"]
    finally:
        stop.set()
        client.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=10)
    assert all(status == 200 for _, status, _ in answers), answers
    assert any(p in ("adding", "retraining") for p, _, _ in answers)  # requests were answered during the update
    old, grown = ["animals", "colors"], ["animals", "colors", "numbers"]
    assert {tuple(k) for p, _, k in answers if p in ("before", "adding")} == {tuple(old)}
    assert [k for p, _, k in answers if p == "after"][-1] == grown
    assert all(k in (old, grown) for _, _, k in answers)  # each request wholly with one router
