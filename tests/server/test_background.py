"""A server started inside the caller's process (server/background.py)."""

import logging

from fastapi import FastAPI

from loramux.server.background import serve_in_background


class _Recording(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records, self.was_closed = [], False

    def emit(self, record):
        self.records.append(record.getMessage())

    def close(self):
        self.was_closed = True
        super().close()


def test_a_background_server_leaves_the_callers_logging_as_it_was():
    # uvicorn's default logging config closes every handler of the process (a library's, a test
    # runner's, the caller's own log file); started in the caller's process, it must not
    handler, root = _Recording(), logging.getLogger()
    root.addHandler(handler)
    try:
        server, thread, url = serve_in_background(FastAPI())
        assert url.startswith("http://127.0.0.1:")
        server.should_exit = True
        thread.join(timeout=10)
        assert not handler.was_closed and handler in root.handlers
        logging.getLogger("loramux.test").warning("still logged")
        assert "still logged" in handler.records
    finally:
        root.removeHandler(handler)
