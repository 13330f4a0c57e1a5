"""The routers suite runs on every (device, dtype)."""

import pytest


@pytest.fixture(autouse=True)
def _on_every_device_and_dtype(where):
    """Every test here runs on each (device, dtype) of `where` (tests/conftest.py)."""
    return where
