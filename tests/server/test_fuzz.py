"""schemathesis against the app's OpenAPI schema, with valid and invalid (negative) data: no request
gets a 5xx or hangs, and every response conforms to the schema the protocol models generate.

CI runs a fixed (derandomized) draw so that a red run is reproducible; set `LORAMUX_FUZZ_EXAMPLES=200`
to explore with fresh random draws (how the `~0` admin path was found)."""

import os

import pytest

from loramux.engine import Engine
from loramux.models import load_base
from loramux.server import ServerConfig, create_app

from ..engine.test_engine import lib  # noqa: F401 (fixture)

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = int(os.environ.get("LORAMUX_FUZZ_EXAMPLES", "0"))


def test_generated_requests_get_no_server_error(tiny_model_dir, lib, tmp_path):
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import response_schema_conformance

    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    root = tmp_path / "uploads"
    root.mkdir()
    app = create_app(engine, lib, ServerConfig(max_tokens_limit=4, request_timeout_s=30, admin_keys=frozenset({"adm"}),
                                               adapter_root=str(root)))
    with TestClient(app):  # runs the lifespan: the scheduler thread serves the generated requests
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        seen = []

        def fuzz(op, mode):
            from hypothesis import given

            @given(op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES or 25, derandomize=not EXAMPLES, deadline=None,
                      suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call(headers={"X-Admin-Key": "adm"})  # admin bodies get fuzzed too
                seen.append((op.path, response.status_code))
                assert response.status_code < 500, (op.path, case.body, response.text)
                if "json" in response.headers.get("content-type", ""):
                    case.validate_response(response, checks=[response_schema_conformance])
            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                assert mode == GenerationMode.NEGATIVE, op.path

        for operation in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation.ok(), mode)
    paths = {p for p, _ in seen}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= paths
    codes = {code for p, code in seen if p == "/v1/completions"}
    assert 400 in codes and codes & {200, 404}  # negative bodies refused with 400; positive ones served or unknown
