"""schemathesis against the app's OpenAPI schema: generated requests never get a 5xx or hang."""

import pytest

from loramux.engine import Engine
from loramux.models import load_base
from loramux.server import ServerConfig, create_app

from ..engine.test_engine import lib  # noqa: F401 (fixture)

schemathesis = pytest.importorskip("schemathesis")


def test_generated_requests_get_no_server_error(tiny_model_dir, lib):
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, settings

    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    app = create_app(engine, lib, ServerConfig(max_tokens_limit=4, request_timeout_s=30))
    with TestClient(app):  # runs the lifespan: the scheduler thread serves the generated requests
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        seen = []

        def fuzz(op):
            from hypothesis import given

            @given(op.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call()
                seen.append((op.path, response.status_code))
                assert response.status_code < 500, (op.path, case.body, response.text)
            check()

        for operation in schema.get_all_operations():
            fuzz(operation.ok())
    paths = {p for p, _ in seen}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= paths
    codes = {code for p, code in seen if p == "/v1/completions"}
    assert codes & {400, 404, 422}  # generated bodies reached the handler and were refused with 4xx, not 5xx
