"""The official `openai` client against a real uvicorn on 127.0.0.1 (random port)."""

import pytest

from loramux.engine import GenerationRequest, SamplingParams

openai = pytest.importorskip("openai")


def alone(engine, prompt, mixture, n, chat=False):
    return engine.generate([GenerationRequest(prompt, mixture, SamplingParams(max_new_tokens=n), chat=chat)])[0].text


def test_openai_client_end_to_end(live):
    engine, url = live
    client = openai.OpenAI(base_url=url, api_key="secret")
    assert {"base", "a", "b", "c"} <= {m.id for m in client.models.list().data}
    r = client.completions.create(model="a", prompt="one two", max_tokens=5, temperature=0)
    assert r.choices[0].text == alone(engine, "one two", {"a": 1.0}, 5)
    r = client.completions.create(model="base", prompt="one two", max_tokens=4, temperature=0,
                                  extra_body={"loramux": {"mix": {"b": 0.5, "c": 0.5}}})
    assert r.choices[0].text == alone(engine, "one two", {"b": 0.5, "c": 0.5}, 4)
    assert r.model_extra["loramux"]["mixture"] == {"b": 0.5, "c": 0.5}
    chat = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "The quick"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == alone(engine, "The quick", {"c": 1.0}, 4, chat=True)
    stream = client.completions.create(model="a", prompt="The quick", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == alone(engine, "The quick", {"a": 1.0}, 6)
    chunks = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": "x y"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == alone(engine, "x y", {"b": 1.0}, 3, chat=True)


def test_openai_client_errors(live):
    _, url = live
    client = openai.OpenAI(base_url=url, api_key="secret", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_concurrent_requests_with_different_mixtures_match_each_alone(live):
    from concurrent.futures import ThreadPoolExecutor

    engine, url = live
    client = openai.OpenAI(base_url=url, api_key="secret")
    mixes = [{"a": 1.0}, {"b": 1.0}, {"c": 1.0}, {"a": 0.5, "b": 0.5}, {"b": 0.3, "c": 0.7}, {"a": -0.5, "c": 1.0},
             {"a": 0.2, "b": 0.2, "c": 0.6}, {"c": 0.5}]
    prompts = ["one two", "The quick brown", "x", "three four five"]

    def ask(i):
        r = client.completions.create(model="base", prompt=prompts[i % 4], max_tokens=5, temperature=0,
                                      extra_body={"loramux": {"mix": mixes[i]}})
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == [alone(engine, prompts[i % 4], mixes[i], 5) for i in range(8)]


@pytest.mark.parametrize("live", [{"max_queue": 32, "max_batch": 8}], indirect=True)
def test_overload_ends_in_200_or_429_and_the_server_stays_healthy(live):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    _, url = live
    headers = {"Authorization": "Bearer secret"}

    def ask(i):
        r = httpx.post(f"{url}/completions", headers=headers, timeout=120,
                       json={"model": ["a", "b", "c", "base"][i % 4], "prompt": f"one {i}", "max_tokens": 3})
        return r.status_code, r.headers.get("retry-after")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(200)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 32  # none lost, no 5xx
    assert all(ra == "1" for c, ra in results if c == 429)
    root = url.rsplit("/v1", 1)[0]
    assert httpx.get(f"{root}/health").status_code == 200 and httpx.get(f"{root}/ready").json()["queue"] == 0
