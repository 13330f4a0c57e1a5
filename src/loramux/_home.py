"""Where loramux keeps what it builds: converted models, fetched data, the default library."""

from __future__ import annotations

import os
from pathlib import Path


def loramux_home() -> Path:
    """`$LORAMUX_HOME`, or `~/.cache/loramux` when unset."""
    env = os.environ.get("LORAMUX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loramux"


def default_library_path() -> Path:
    return loramux_home() / "library"


def prediction_cache_path() -> Path:
    """Where benchmarks keep scored predictions (see evaluation.composite.MixtureScorer)."""
    return loramux_home() / "cache" / "predictions"
