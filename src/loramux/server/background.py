"""Serve the app under uvicorn in a background thread of this process, on a free loopback port:
what `loramux demo`, the serving benchmarks and the tests need (`loramux serve` runs it in front)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import LoramuxError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_in_background(app, host: str = "127.0.0.1", timeout: float = 60.0):
    """Start `app` and return (uvicorn server, its thread, base URL) once it accepts connections.
    Stop it with `server.should_exit = True; thread.join()`."""
    import uvicorn

    port = free_port(host)
    # log_config=None: uvicorn's default logging config (a dictConfig) closes every log handler of
    # the process it runs in; a server started inside the caller's process leaves the caller's
    # logging as it was, and its warnings go through the caller's root logger.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LoramuxError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}"
