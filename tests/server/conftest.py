"""A real uvicorn serving the tiny model on 127.0.0.1 (random port), for the client and browser tests."""

import socket
import threading
import time

import pytest

from loramux.engine import Engine
from loramux.models import load_base
from loramux.server import ServerConfig, create_app

from ..engine.test_engine import lib  # noqa: F401 (fixture)


@pytest.fixture
def live(tiny_model_dir, lib, request):
    import uvicorn

    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in lib.names():
        engine.load(n)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = getattr(request, "param", {})
    app = create_app(engine, lib, ServerConfig(api_keys=frozenset({"secret"}), **extra))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)
