import io
import json
import tarfile

import pytest

from loramux.data import load_task
from loramux.data import fetch as fetch_mod
from loramux.errors import LoramuxError


def _sdist(path):
    """A stand-in for the bigbench sdist with the same layout."""
    tasks = {
        "alpha/task.json": {"name": "alpha", "task_prefix": "P:", "examples": [{"input": f"q{i}", "target": f"a{i}"} for i in range(10)]},
        "beta/task.json": {"name": "beta", "subtasks": [{"name": "beta:one"}]},
        "beta/one/task.json": {"name": "beta:one", "examples": [{"input": "x", "target": "y"}] * 5},
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    archive = _sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setattr(fetch_mod, "_download_sdist", lambda cache: archive)


def test_fetch_extracts_and_splits(tmp_path, fake_download):
    (out,) = fetch_mod.fetch_bigbench(["alpha"], tmp_path / "data")
    train, test = load_task(out, "train"), load_task(out, "test")
    assert (len(train), len(test)) == (8, 2)
    assert train.examples[0].prompt.startswith("P:")  # metadata kept in both files
    assert not {e.prompt for e in train.examples} & {e.prompt for e in test.examples}
    again = fetch_mod.fetch_bigbench(["alpha"], tmp_path / "data2")[0]
    assert (again / "test.json").read_text() == (out / "test.json").read_text()  # deterministic


def test_fetch_subtask(tmp_path, fake_download):
    (out,) = fetch_mod.fetch_bigbench(["beta/one"], tmp_path / "data")
    assert out.name == "beta__one" and len(load_task(out, "train")) == 4


def test_fetch_errors(tmp_path, fake_download):
    with pytest.raises(LoramuxError, match=r"task\(s\) \['gamma'\] are not in bigbench==1.0.0"):
        fetch_mod.fetch_bigbench(["gamma"], tmp_path)
    with pytest.raises(LoramuxError, match=r"has subtasks.*\['beta/one'\]"):
        fetch_mod.fetch_bigbench(["beta"], tmp_path)
    with pytest.raises(LoramuxError, match="no tasks given"):
        fetch_mod.fetch_bigbench([], tmp_path)


def test_an_index_without_the_package_says_where_a_copy_is_read_from(tmp_path, monkeypatch):
    """pip failing (an index that lists only the 0.0.1 placeholder) names the cache folder; an
    archive put there is read without asking pip."""
    import subprocess

    calls = []

    def failing(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for bigbench==1.0.0")

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing)
    cache = tmp_path / "downloads"
    with pytest.raises(LoramuxError, match="put a copy of bigbench-1.0.0.tar.gz in") as err:
        fetch_mod._download_sdist(cache)
    assert str(cache) in str(err.value) and len(calls) == 1
    _sdist(cache / "bigbench-1.0.0.tar.gz")
    assert fetch_mod._download_sdist(cache) == cache / "bigbench-1.0.0.tar.gz" and len(calls) == 1
