"""`loramux data fetch bigbench`: get real BIG-bench tasks the way anyone can here.

The `bigbench` 1.0.0 source package on PyPI carries every task.json. We fetch it with pip's own
downloader (so pip's index configuration and proxies apply), cache the archive, extract only the
requested tasks, and split each deterministically into train.json / test.json (each a complete
BIG-bench task file, metadata included).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from .._atomic import atomic_write_json
from .._home import loramux_home
from ..errors import LoramuxError
from .loading import TEST_FRACTION

BIGBENCH_SDIST = "bigbench==1.0.0"
_TASKS_DIR = "bigbench/benchmark_tasks/"


def _download_sdist(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("bigbench-1.0.0.tar.gz"))
    if found:
        return found[0]
    # --no-binary names this package alone: ":all:" would also build its build dependencies from
    # source just to read its metadata
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "bigbench", BIGBENCH_SDIST, "-d", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("bigbench-1.0.0.tar.gz"))
    if result.returncode != 0 or not found:
        raise LoramuxError(f"could not download {BIGBENCH_SDIST} with `{' '.join(cmd)}`:\n{result.stderr[-2000:]}\n"
                           f"Where the package index does not serve it (some mirrors list only the 0.0.1 "
                           f"placeholder, which holds no tasks), put a copy of bigbench-1.0.0.tar.gz in {cache} "
                           f"and run again: it is read from there.")
    return found[0]


def split_task_json(data: dict, *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[dict, dict]:
    """Split a task.json's examples into train/test files that keep all of its metadata."""
    examples = list(data["examples"])
    random.Random(seed).shuffle(examples)
    n_test = max(1, round(len(examples) * test_fraction))
    meta = {k: v for k, v in data.items() if k != "examples"}
    return {**meta, "examples": examples[n_test:]}, {**meta, "examples": examples[:n_test]}


def fetch_bigbench(tasks: list[str], dest: Path | None = None, *, seed: int = 0) -> list[Path]:
    """Extract `tasks` (names, or `task/subtask`) from the bigbench sdist into `dest`/<name>/."""
    if not tasks:
        raise LoramuxError("no tasks given; pass task names such as --tasks hyperbaton,navigate")
    dest = Path(dest) if dest else loramux_home() / "data" / "bigbench"
    archive = _download_sdist(loramux_home() / "downloads")
    wanted = {f"{t.strip('/')}/task.json": t for t in tasks}
    found: dict[str, dict] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            _, sep, rel = member.name.partition(_TASKS_DIR)
            if sep and rel in wanted and member.isfile():
                found[wanted[rel]] = json.load(tar.extractfile(member))
    missing = [t for t in tasks if t not in found]
    if missing:
        raise LoramuxError(f"task(s) {missing} are not in {BIGBENCH_SDIST}; use BIG-bench task directory "
                           f"names (e.g. hyperbaton), or task/subtask for tasks that have subtasks")
    written = []
    for name, data in found.items():
        if not data.get("examples"):
            subs = [str(s.get("name", "")).split(":")[-1] for s in data.get("subtasks", []) if isinstance(s, dict)]
            options = [f"{name}/{s}" for s in subs]
            raise LoramuxError(f"task {name!r} has subtasks and no examples of its own; fetch one of {options}")
        train, test = split_task_json(data, seed=seed)
        out = dest / name.replace("/", "__")
        atomic_write_json(out / "train.json", train)
        atomic_write_json(out / "test.json", test)
        written.append(out)
    return written


def missing_tasks(root: Path, tasks: list[str]) -> list[str]:
    """The tasks of `tasks` that have no train.json and test.json under `root`."""
    return [t for t in tasks if not all((Path(root) / t.replace("/", "__") / f"{s}.json").is_file()
                                        for s in ("train", "test"))]


def ensure_bigbench(tasks: list[str], root: Path | None = None, *, log=print) -> Path:
    """Make sure `tasks` are on disk under `root` (default $LORAMUX_HOME/data/bigbench), fetching
    the missing ones from the bigbench sdist on PyPI (saying so first: a one-time ~360 MB
    download, cached under $LORAMUX_HOME/downloads). Returns `root`."""
    root = Path(root) if root else loramux_home() / "data" / "bigbench"
    missing = missing_tasks(root, tasks)
    if missing:
        cached = (loramux_home() / "downloads" / "bigbench-1.0.0.tar.gz").is_file()
        log(f"[loramux] tasks {missing} are not in {root}: fetching them from {BIGBENCH_SDIST} on PyPI"
            + ("" if cached else " (a one-time ~360 MB download, about a minute on a fast link)"))
        fetch_bigbench(missing, root)
    return root
