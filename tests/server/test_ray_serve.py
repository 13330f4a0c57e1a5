"""`loramux serve --ray`: Ray Serve with 2 replicas on a local Ray (2 CPUs) answers the openai
client exactly as `loramux serve` does (same app, same greedy output, same auth)."""

import pytest

from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.errors import LoramuxError
from loramux.models import load_base
from loramux.server import ServerConfig
from loramux.server.background import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'loramux[ray]')")
openai = pytest.importorskip("openai")


def test_two_replicas_answer_like_loramux_serve(tiny_model_dir, lib, where):
    from loramux.server import ray_serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.run(str(tiny_model_dir), str(lib.path), ServerConfig(api_keys=frozenset({"secret"})), port=port,
                      blocking=False, replicas=2, ray_actor_options={"num_cpus": 0.5}, device=where.device,
                      dtype=where.dtype)  # the replicas load the model as this test's engine does
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        local = Engine(load_base(str(tiny_model_dir)), lib)
        for n in lib.names():
            local.load(n)
        for prompt, model, mix in [("one two", "a", {"a": 1.0}), ("The quick", "base", {"b": 0.5, "c": 0.5}),
                                   ("x y z", "c", {"c": 1.0})] * 2:  # twice: both replicas get requests
            extra = {"loramux": {"mix": mix}} if model == "base" else {}
            r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, extra_body=extra)
            alone = local.generate([GenerationRequest(prompt, mix, SamplingParams(max_new_tokens=5), chat=False)])[0]
            assert r.choices[0].text == alone.text
            assert r.model_extra["loramux"]["mixture"] == mix
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
        status = serve.status().applications["loramux"].deployments["loramux"]
        assert status.status == "HEALTHY" and sum(status.replica_states.values()) == 2
    finally:
        serve.shutdown()
        ray.shutdown()


def test_runtime_adapter_changes_with_several_replicas_are_refused(tiny_model_dir, lib):
    from loramux.server import ray_serve

    with pytest.raises(LoramuxError, match="would reach only one replica"):
        ray_serve.deployment(str(tiny_model_dir), str(lib.path), ServerConfig(admin_keys=frozenset({"k"})), replicas=2)
    with pytest.raises(LoramuxError, match="--replicas must be >= 1; got 0"):
        ray_serve.deployment(str(tiny_model_dir), str(lib.path), ServerConfig(), replicas=0)
