"""A real uvicorn serving the tiny model on 127.0.0.1 (random port), for the client and browser tests."""

import pytest

from loramux.engine import Engine
from loramux.models import load_base
from loramux.server import ServerConfig, create_app
from loramux.server.background import serve_in_background

from ..engine.test_engine import lib  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _on_every_device_and_dtype(where):
    """Every test here runs on each (device, dtype) of `where` (tests/conftest.py)."""
    return where


@pytest.fixture
def live(tiny_model_dir, lib, request):
    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    extra = getattr(request, "param", {})
    app = create_app(engine, lib, ServerConfig(api_keys=frozenset({"secret"}), **extra))
    server, thread, root = serve_in_background(app)
    yield engine, f"{root}/v1"
    server.should_exit = True
    thread.join(timeout=10)
