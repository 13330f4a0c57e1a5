import threading

import pytest

from loramux.cpu_threads import on_passing_thread


def test_runs_on_another_thread_that_ends():
    seen = {}

    def fn():
        seen["thread"] = threading.current_thread()
        return 42

    assert on_passing_thread(fn) == 42
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()  # its OpenMP pool, if any, went with it


def test_raises_the_functions_error_on_the_caller():
    def fn():
        raise ValueError("no model")

    with pytest.raises(ValueError, match="no model"):
        on_passing_thread(fn)
