"""The README's `make demo`, from a bare clone: no `../shared` beside it, an empty $LORAMUX_HOME.

The clone runs its own code (PYTHONPATH) with the interpreter this suite runs in; `make`'s install
step is marked done (`-o`), since installing is what CI's own `make test` has just done. The
demo's tasks are not on disk, so the demo fetches them: the bigbench sdist it would download
(~360 MB from PyPI) is stood in for by an archive of the same layout in the download cache, and
the tiny model stands in for SmolLM2. Everything else is the path a new user takes.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from loramux.cli.demo import DEMO_TASKS

REPO = Path(__file__).resolve().parents[1]


def stand_in_sdist(path: Path, tasks: list[str]) -> Path:
    """A bigbench-1.0.0 sdist holding a small learnable multiple-choice task under each name."""
    words = ["red", "green", "blue", "one", "two", "three"]
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate(tasks):
            examples = [{"input": f"{name.replace('_', ' ')} question {k}: the word is {words[i % 6]}",
                         "target_scores": {"yes": int((i + k) % 2 == 0), "no": int((i + k) % 2 == 1)}}
                        for i in range(30)]
            raw = json.dumps({"name": name, "append_choices_to_input": False, "example_input_prefix": "",
                              "example_output_prefix": "\nAnswer: ", "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.mark.skipif(not (shutil.which("git") and shutil.which("make") and (REPO / ".git").exists()),
                    reason="needs git, make and a git checkout")
def test_make_demo_runs_from_a_bare_clone(tmp_path, tiny_model_dir):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert not (clone.parent / "shared").exists()
    home = tmp_path / "home"
    tasks = DEMO_TASKS.split(",")
    (home / "downloads").mkdir(parents=True)
    stand_in_sdist(home / "downloads" / "bigbench-1.0.0.tar.gz", tasks)
    venv = Path(sys.prefix)
    env = {**os.environ, "LORAMUX_HOME": str(home), "PYTHONPATH": str(clone / "src")}
    env.pop("LORAMUX_SHARED_DATA", None)
    args = f"--model {tiny_model_dir} --steps 3 --show 1 --score-limit 4 --router-prompts 20"
    done = subprocess.run(["make", "-o", f"{venv}/.installed", "demo", f"VENV={venv}", f"DEMO_ARGS={args}"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fetching them from bigbench==1.0.0" in out and "estimate on this machine" in out
    assert out.count("  routing:") == len(tasks) and out.count("  base:") == len(tasks)
    assert "scores on the first 4 test examples" in out and "adapter" in out
    for t in tasks:
        assert (home / "data" / "bigbench" / t / "train.json").is_file()
    assert not (clone.parent / "shared").exists()
