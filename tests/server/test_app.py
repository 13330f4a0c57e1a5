import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.models import load_base
from loramux.server import ServerConfig, create_app

from ..engine.test_engine import lib  # noqa: F401 (fixture)


@pytest.fixture
def served(tiny_model_dir, lib):
    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    return engine, lib


def client_for(engine, lib, **config):
    return TestClient(create_app(engine, lib, ServerConfig(**config)))


def greedy_alone(engine, prompt, mixture, n, chat=False):
    return engine.generate([GenerationRequest(prompt, mixture, SamplingParams(max_new_tokens=n, temperature=0),
                                              chat=chat)])[0]


def test_completion_with_an_adapter_and_an_explicit_mix(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "a", "prompt": "one two", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = greedy_alone(engine, "one two", {"a": 1.0}, 5)
        assert body["choices"][0]["text"] == expected.text and body["object"] == "text_completion"
        assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids),
                                 "total_tokens": expected.prompt_tokens + len(expected.token_ids)}
        assert body["loramux"]["mixture"] == {"a": 1.0} and body["loramux"]["adapter_versions"] == {"a": 1}
        r = c.post("/v1/completions", json={"model": "base", "prompt": "one two", "max_tokens": 4, "temperature": 0,
                                            "loramux": {"mix": {"b": 0.7, "c": 0.3}}})
        assert r.json()["choices"][0]["text"] == greedy_alone(engine, "one two", {"b": 0.7, "c": 0.3}, 4).text


def test_chat_and_streaming(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/chat/completions", json={"model": "c", "messages": [{"role": "user", "content": "one two"}],
                                                 "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        expected = greedy_alone(engine, "one two", {"c": 1.0}, 4, chat=True)
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
        with c.stream("POST", "/v1/completions", json={"model": "a", "prompt": "The quick", "max_tokens": 6,
                                                       "temperature": 0, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert chunks[0]["loramux"]["mixture"] == {"a": 1.0}  # the first chunk echoes the routing
        text = "".join(ch["choices"][0]["text"] for ch in chunks[:-1])
        assert text == greedy_alone(engine, "The quick", {"a": 1.0}, 6).text
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1  # include_usage


def test_models_health_metrics(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert {"base", "a", "b", "c", "arrow"} <= set(ids) and ids["a"]["parent"] == engine.base.model_id
        assert c.get("/health").json() == {"status": "ok"} and c.get("/ready").status_code == 200
        c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
        text = c.get("/metrics").text
        assert "loramux_output_tokens_total" in text and 'loramux_adapter_requests_total{adapter="a"}' in text


def test_arrow_requests(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "arrow", "prompt": "one two", "max_tokens": 3, "temperature": 0,
                                            "loramux": {"explain": True}})
        assert r.status_code == 200, r.text
        echo = r.json()["loramux"]
        assert echo["router"] == "arrow" and echo["explain"]["granularity"] == "token"


@pytest.mark.parametrize("body, status, match", [
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' is not served here"),
    ({"prompt": "x"}, 400, "model: required"),
    ({"model": "a", "prompt": ""}, 400, "prompt: String should have at least 1 character"),
    ({"model": "a", "prompt": "x", "max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 0"),
    ({"model": "a", "prompt": "x", "temperature": -1}, 400, "temperature: Input should be greater than or equal to 0"),
    ({"model": "a", "prompt": "x", "best_of": 2}, 400, "best_of: best_of other than n is not supported"),
    ({"model": "a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens: 0 only makes sense with echo"),
    ({"model": "a", "prompt": "x", "logprobs": 99}, 400, "logprobs: Input should be less than or equal to 20"),
    ({"model": "base", "prompt": "x", "loramux": {"mix": {"zz": 1}}}, 400, "not loaded"),
    ({"model": "base", "prompt": "x", "loramux": {"mix": {"a": float("nan")}}}, 400, "loramux.mix.a: Input should be a finite number"),
    ({"model": "dlp", "prompt": "x"}, 404, "no router named 'dlp'"),
])
def test_bad_requests_get_openai_errors(served, body, status, match):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", content=json.dumps(body, allow_nan=True),
                   headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert match in r.json()["error"]["message"]


def test_api_keys_and_body_limit(served):
    engine, lib = served
    with client_for(engine, lib, api_keys=frozenset({"k1"}), max_body_bytes=200) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
        r = c.post("/v1/completions", headers={"Authorization": "Bearer k1"},
                   json={"model": "a", "prompt": "x" * 500})
        assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(served):
    engine, lib = served
    app = create_app(engine, lib, ServerConfig(max_queue=1))
    server = app.state.server
    server.scheduler.submit(GenerationRequest("x", None, SamplingParams(max_new_tokens=2)))  # fills the queue
    c = TestClient(app)  # no lifespan: the scheduler is not running, so the queue stays full
    r = c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"


def test_serve_refuses_an_open_bind_without_keys(capsys, monkeypatch):
    from ..cli.test_cli import run

    monkeypatch.delenv("LORAMUX_API_KEYS", raising=False)
    code, _, err = run(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2 and "refusing to bind '0.0.0.0' without API keys" in err
    code, _, err = run(capsys, "serve", "--api-key-file", "/no/such/file")
    assert code == 2 and "cannot read --api-key-file" in err


def test_echo_scores_the_prompt_like_a_forward(served):
    import torch

    engine, lib = served
    prompt = "The quick brown fox jumps"
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "b", "prompt": prompt, "max_tokens": 0, "echo": True,
                                            "logprobs": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
    ids = engine.base.tokenizer(prompt)["input_ids"]
    with torch.no_grad(), engine.fused.mixture(engine.fused.sequence_mixture([{"b": 1.0}])):
        logp = torch.log_softmax(engine.base.model(input_ids=torch.tensor([ids], device=engine.base.model.device)).logits[0].float(), -1)
    lp = choice["logprobs"]
    assert choice["text"] == prompt and len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])


def test_generation_logprobs(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "a", "prompt": "one two", "max_tokens": 4, "temperature": 0,
                                            "logprobs": 2})
        lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) >= 1
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the best


def test_adapter_lifecycle(served, tiny_base, tmp_path):
    from ..library.conftest import make_peft_dir

    engine, lib = served
    root = tmp_path / "uploads"
    new = make_peft_dir(tiny_base, root / "d", targets=("q_proj",), r=2, seed=5)
    with client_for(engine, lib, admin_keys=frozenset({"adm"}), adapter_root=str(root)) as c:
        admin = {"X-Admin-Key": "adm"}
        assert c.post("/v1/adapters", json={"name": "d", "path": str(new)}).status_code == 403  # no admin key
        r = c.post("/v1/adapters", json={"name": "d", "path": str(new)}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1 and "d" in engine.adapters
        out = c.post("/v1/completions", json={"model": "d", "prompt": "one", "max_tokens": 2, "temperature": 0})
        assert out.status_code == 200 and out.json()["loramux"]["adapter_versions"] == {"d": 1}
        r = c.post("/v1/adapters", json={"name": "d", "path": str(new), "expected_version": 7}, headers=admin)
        assert r.status_code == 409 and "version 1, not the expected 7" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "d", "path": str(new), "expected_version": 1}, headers=admin)
        assert r.json()["version"] == 2
        outside = make_peft_dir(tiny_base, tmp_path / "elsewhere", seed=6)
        r = c.post("/v1/adapters", json={"name": "e", "path": str(outside)}, headers=admin)
        assert r.status_code == 403 and "outside the allowed adapter root" in r.json()["error"]["message"]
        assert c.delete("/v1/adapters/d", headers=admin).json() == {"name": "d", "unloaded": True}
        assert c.delete("/v1/adapters/d", headers=admin).status_code == 404
        assert c.post("/v1/completions", json={"model": "d", "prompt": "x"}).status_code == 404


def test_web_view_and_its_endpoints(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        page = c.get("/")
        assert page.status_code == 200 and "<title>loramux</title>" in page.text and "/v1/loramux/route" in page.text
        view = c.get("/v1/loramux/library").json()
        assert [a["name"] for a in view["adapters"]] == ["a", "b", "c"] and all(a["loaded"] for a in view["adapters"])
        assert "arrow" in view["routers"]
        c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2,
                                        "loramux": {"mix": {"a": 0.25, "c": 0.75}}})
        recent = c.get("/v1/loramux/recent").json()["requests"]
        assert recent[0]["adapters"] == ["a", "c"] and recent[0]["weights"] == [0.25, 0.75] and recent[0]["model"] == "base"
        r = c.post("/v1/loramux/route", json={"model": "arrow", "prompt": "one two three"})
        assert r.status_code == 200 and r.json()["router"] == "arrow" and r.json()["layers"]
        r = c.post("/v1/loramux/route", json={"model": "a", "prompt": "x"})
        assert r.status_code == 400 and "model: String should match pattern" in r.json()["error"]["message"]


def test_web_view_lists_a_request_while_it_runs(served):
    import threading

    engine, lib = served
    app = create_app(engine, lib, ServerConfig())
    server, gate, first = app.state.server, threading.Event(), threading.Event()

    def hold(delta):  # runs on the scheduler thread: the request stays in flight until released
        first.set()
        gate.wait(timeout=30)

    with TestClient(app) as c:
        request = GenerationRequest("one two", {"a": 0.25, "c": 0.75}, SamplingParams(max_new_tokens=8, ignore_eos=True))
        future = server.submit(request, None, on_delta=hold, model="base")
        assert first.wait(timeout=30)
        view = c.get("/v1/loramux/recent").json()
        assert [(q["model"], q["adapters"], q["weights"]) for q in view["live"]] == [("base", ["a", "c"], [0.25, 0.75])]
        assert view["live"][0]["tokens"] >= 1 and view["requests"] == []
        gate.set()
        assert len(future.result(timeout=30).token_ids) == 8
        view = c.get("/v1/loramux/recent").json()
        assert view["live"] == [] and view["requests"][0]["adapters"] == ["a", "c"]


def test_a_request_is_tokenized_once(served, monkeypatch):
    engine, lib = served
    tokenized = []
    row = engine._row

    def counting(req, i=0, ids=None):
        tokenized.append(ids is None)
        return row(req, i, ids)

    monkeypatch.setattr(engine, "_row", counting)
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "a", "prompt": "one two", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
    assert tokenized == [False]  # tokenized and checked by the server, admitted with the same tokens
    monkeypatch.undo()
    assert r.json()["choices"][0]["text"] == greedy_alone(engine, "one two", {"a": 1.0}, 3).text


def test_a_request_refused_at_admission_leaves_no_bookkeeping(served):
    from loramux.errors import LoramuxError

    engine, lib = served
    app = create_app(engine, lib, ServerConfig())
    server = app.state.server
    with TestClient(app):
        # a mixture naming an adapter that is not loaded (e.g. unloaded while the request waited)
        future = server.submit(GenerationRequest("one two", {"zzz": 1.0}, SamplingParams(max_new_tokens=2)), None,
                               model="base")
        with pytest.raises(LoramuxError, match="zzz"):
            future.result(timeout=30)
        assert server._models == {} and server.live == {}


# ---------------------------------------------------------------------------- every prompt form
def test_every_completions_prompt_form_and_n(served):
    engine, lib = served
    tok = engine.base.tokenizer
    ids = [tok("one two")["input_ids"], tok("The quick")["input_ids"]]
    with client_for(engine, lib) as c:
        def texts(prompt, **kw):
            r = c.post("/v1/completions", json={"model": "a", "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw})
            assert r.status_code == 200, r.text
            return [(ch["index"], ch["text"]) for ch in r.json()["choices"]]

        want = [greedy_alone(engine, p, {"a": 1.0}, 4).text for p in ("one two", "The quick")]
        assert texts("one two") == [(0, want[0])]
        assert texts(["one two", "The quick"]) == [(0, want[0]), (1, want[1])]
        assert texts(ids[0]) == [(0, want[0])]
        assert texts(ids) == [(0, want[0]), (1, want[1])]
        assert texts(["one two", "The quick"], n=2) == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]
        r = c.post("/v1/completions", json={"model": "a", "prompt": "x", "n": 3, "temperature": 1.0, "seed": 4,
                                            "max_tokens": 6, "loramux": {"ignore_eos": True}})
        assert r.json()["usage"]["completion_tokens"] == 18 and len(r.json()["choices"]) == 3


def test_llama_cpp_lora_field_and_adapter_list(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        listed = c.get("/lora-adapters").json()
        assert [(a["id"], a["name"]) for a in listed] == [(0, "a"), (1, "b"), (2, "c")]
        r = c.post("/v1/completions", json={"model": "base", "prompt": "one two", "max_tokens": 4, "temperature": 0,
                                            "lora": [{"id": 1, "scale": 0.7}, {"id": "c", "scale": 0.3}]})
        assert r.json()["choices"][0]["text"] == greedy_alone(engine, "one two", {"b": 0.7, "c": 0.3}, 4).text
        assert r.json()["loramux"]["mixture"] == {"b": 0.7, "c": 0.3}
        r = c.post("/v1/completions", json={"model": "base", "prompt": "one two", "max_tokens": 4, "temperature": 0,
                                            "lora": [{"id": 0, "scale": 0}]})  # all scales 0: the base model
        assert r.json()["choices"][0]["text"] == greedy_alone(engine, "one two", None, 4).text


def test_echo_logprobs_for_a_router_and_chat_logprobs(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "arrow", "prompt": "one two three", "max_tokens": 0, "echo": True,
                                            "logprobs": 2})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and all(isinstance(v, float) for v in lp["token_logprobs"][1:])
        assert r.json()["loramux"]["router"] == "arrow"
        r = c.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "one"}],
                                                 "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) >= 1 and all(len(t["top_logprobs"]) == 2 for t in content)
        assert all(t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"], abs=1e-6) for t in content)


def test_a_request_deadline_ends_it_with_504(served):
    engine, lib = served
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": engine.max_context - 8,
                                            "loramux": {"ignore_eos": True, "timeout_s": 0.001}})
        assert r.status_code == 504 and "did not finish within 0.001s" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_failed_swap_keeps_the_old_version_serving(served, tiny_base, tmp_path):
    from ..library.conftest import make_peft_dir

    engine, lib = served
    root = tmp_path / "uploads"
    broken = make_peft_dir(tiny_base, root / "broken", targets=("q_proj",), r=2, seed=9)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    before = greedy_alone(engine, "one two", {"a": 1.0}, 4).text
    with client_for(engine, lib, admin_keys=frozenset({"adm"}), adapter_root=str(root)) as c:
        r = c.post("/v1/adapters", json={"name": "a", "path": str(broken)}, headers={"X-Admin-Key": "adm"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        out = c.post("/v1/completions", json={"model": "a", "prompt": "one two", "max_tokens": 4, "temperature": 0})
        assert out.json()["choices"][0]["text"] == before and out.json()["loramux"]["adapter_versions"] == {"a": 1}
    assert lib.get("a").version == 1 and engine.adapters == ["a", "b", "c"]


def test_a_replace_is_committed_only_once_the_engine_holds_it(served, tiny_base, tmp_path, monkeypatch):
    """The new version is loaded beside the old one first; a library write that fails leaves the
    old version serving; a replace that works keeps the adapter's slot (its llama.cpp id)."""
    from ..library.conftest import make_peft_dir

    engine, lib = served
    new = make_peft_dir(tiny_base, tmp_path / "uploads" / "a2", targets=("q_proj", "v_proj"), r=4, seed=42)
    before = greedy_alone(engine, "one two", {"a": 1.0}, 4).text
    admin = {"X-Admin-Key": "adm"}
    real_add = lib.add

    def failing_add(*args, **kwargs):
        assert len(engine.adapters) == 4  # the new version is already in the engine, beside the old
        raise OSError("disk full")

    app = create_app(engine, lib, ServerConfig(admin_keys=frozenset({"adm"}), adapter_root=str(tmp_path / "uploads")))
    with TestClient(app, raise_server_exceptions=False) as c:  # a server fault: answered 500, as a real server would
        monkeypatch.setattr(lib, "add", failing_add)
        r = c.post("/v1/adapters", json={"name": "a", "path": str(new)}, headers=admin)
        assert r.status_code == 500 and "internal error" in r.json()["error"]["message"]
        assert engine.adapters == ["a", "b", "c"] and lib.get("a").version == 1
        assert greedy_alone(engine, "one two", {"a": 1.0}, 4).text == before
        monkeypatch.setattr(lib, "add", real_add)
        r = c.post("/v1/adapters", json={"name": "a", "path": str(new)}, headers=admin)
        assert r.status_code == 200 and r.json()["version"] == 2
        assert engine.adapters == ["a", "b", "c"] and c.get("/lora-adapters").json()[0]["name"] == "a"
    from loramux.engine import Engine

    fresh = Engine(load_base(engine.base.model_id), lib)
    fresh.load("a")
    assert greedy_alone(engine, "one two", {"a": 1.0}, 4).text == greedy_alone(fresh, "one two", {"a": 1.0}, 4).text


def test_a_request_that_fails_in_the_decode_loop_gets_a_500_and_the_others_go_on(served, monkeypatch):
    """A fault inside the scheduler (here: sampling one row) is that request's alone: a 500 naming its
    request id, or an error event and [DONE] on a stream; the request beside it is unchanged."""
    from loramux.engine import engine as engine_module

    engine, lib = served
    real = engine_module._Row.take

    def take(self, chosen, tokenizer):
        if "poison" in self.request.prompt and self.tokens:
            raise RuntimeError("boom")
        return real(self, chosen, tokenizer)

    expected = greedy_alone(engine, "one two", {"b": 1.0}, 6).text
    monkeypatch.setattr(engine_module._Row, "take", take)
    with TestClient(create_app(engine, lib, ServerConfig()), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "a", "prompt": "poison", "max_tokens": 6,
                                            "loramux": {"ignore_eos": True}})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.json()["error"]["message"].startswith("internal error while serving request cmpl-")
        with c.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 6,
                                                            "messages": [{"role": "user", "content": "poison"}],
                                                            "loramux": {"ignore_eos": True}}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and "internal error" in json.loads(lines[-2][6:])["error"]["message"]
        r = c.post("/v1/completions", json={"model": "b", "prompt": "one two", "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"] == expected


def test_echo_logprobs_under_a_mixture_equal_the_scoring_function(served):
    from loramux.engine.logprobs import prompt_logprobs

    engine, lib = served
    mix = {"a": 0.3, "c": 0.7}
    with client_for(engine, lib) as c:
        r = c.post("/v1/completions", json={"model": "base", "prompt": "one two three", "max_tokens": 0, "echo": True,
                                            "logprobs": 0, "loramux": {"mix": mix}})
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    ids = engine.base.tokenizer("one two three")["input_ids"]
    assert got == pytest.approx([lp for _, lp, _ in prompt_logprobs(engine, ids, mix).entries], abs=1e-6)


def test_routing_and_scoring_run_on_the_scheduler_thread(served, monkeypatch):
    """The fused layers hold per-forward state: every use of the model, a router's included, runs on
    the one thread that owns it."""
    import threading

    from loramux.engine import logprobs as logprobs_module
    from loramux.routers.routing import Routing

    engine, lib = served
    threads = []

    class Recording:
        kind, granularity = "dlp", "sequence"

        def route(self, prompts, **options):
            threads.append(threading.current_thread().name)
            return [Routing(("a",), (1.0,), {"a": 1.0}, router="dlp") for _ in prompts]

    real = logprobs_module.prompt_logprobs

    def scoring(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr("loramux.server.openai_routes.prompt_logprobs", scoring)
    with TestClient(create_app(engine, lib, ServerConfig(routers={"dlp": Recording()}))) as c:
        r = c.post("/v1/completions", json={"model": "dlp", "prompt": "one two", "max_tokens": 2, "echo": True,
                                            "logprobs": 1})
        assert r.status_code == 200 and r.json()["loramux"]["mixture"] == {"a": 1.0}
    assert threads == ["loramux-scheduler", "loramux-scheduler"]  # routed once, then scored


def test_a_compiled_engine_serves_what_the_eager_one_does(served, where):
    """--compile: the server's scheduler decodes through the compiled step (the graph run
    uncompiled here; tests/engine/test_compiled.py compiles it), on prepacked weights."""
    from concurrent.futures import ThreadPoolExecutor

    from loramux.engine.compiled import CompiledDecoder

    if where.dtype != "float32":
        pytest.skip("token-for-token equality is an fp32 claim")
    engine, lib = served
    asks = [("a", None, "one two"), ("base", {"b": 0.7, "c": 0.3}, "The quick brown"), ("base", None, "x"),
            ("c", None, "one two three")]
    expected = [greedy_alone(engine, p, {m: 1.0} if m != "base" else mix, 6).text for m, mix, p in asks]
    engine.compiled = CompiledDecoder(engine.fused, backend="eager")

    def ask(c, model, mix, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        if mix:
            body["loramux"] = {"mix": mix}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with client_for(engine, lib) as c, ThreadPoolExecutor(4) as pool:
        deadline = time.monotonic() + 900  # dynamo traces each batch shape (minutes on a busy CPU)
        while c.get("/ready").status_code != 200:  # the warm-up runs beside the server
            assert time.monotonic() < deadline, "the warm-up did not end"
            time.sleep(0.05)
        got = list(pool.map(lambda a: ask(c, *a), asks))
    assert got == expected
    assert engine.compiled.compile_seconds  # its step ran (a first call per shape is recorded)


class _SlowCompile:
    """A compiled decoder whose warm-up waits for the test (or fails when told to)."""

    def __init__(self, fail: bool = False):
        self.go, self.fail = threading.Event(), fail

    def warmup(self, max_rows: int) -> dict:
        assert self.go.wait(60)
        if self.fail:
            raise RuntimeError("no compiler here")
        return {}


@pytest.mark.parametrize("fail", [False, True], ids=["compiles", "compile-fails"])
def test_the_server_answers_while_its_decode_step_compiles(served, fail):
    """--compile's warm-up runs beside the server: /health answers, /ready and generation say
    503 (warming, with Retry-After) until it ends; a failed compile serves with the eager step."""
    engine, lib = served
    slow = engine.compiled = _SlowCompile(fail)
    body = {"model": "a", "prompt": "one two", "max_tokens": 3, "temperature": 0}
    try:
        with client_for(engine, lib) as c:
            assert c.get("/health").status_code == 200
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["warming"] is True
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up", r.text
            assert r.headers["retry-after"] == "5" and "GET /ready" in r.json()["error"]["message"]
            slow.go.set()
            deadline = time.monotonic() + 30
            while c.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "the warm-up did not end"
                time.sleep(0.02)
            assert c.get("/ready").json()["warming"] is False
            if fail:
                assert engine.compiled is None  # serving eagerly
            engine.compiled = None  # the stand-in cannot decode
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy_alone(engine, "one two", {"a": 1.0}, 3).text
    finally:
        engine.compiled = None
