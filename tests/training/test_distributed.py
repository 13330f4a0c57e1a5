"""Training on a local Ray (2 CPUs) with the tiny model: adapters land via the driver, and a worker
killed mid-task is retried while the library stays valid."""

import os

import pytest

from loramux.data import load_task
from loramux.errors import LoramuxError
from loramux.library import Library
from loramux.training import LoraTrainConfig

from ..conftest import toy_mc_task

ray = pytest.importorskip("ray")
CFG = LoraTrainConfig(rank=2, steps=3, batch_size=4, warmup_steps=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tasks(tmp_path, names):
    for n in names:
        toy_mc_task(tmp_path / "data" / n / "train.json", n=8)
    return [load_task(tmp_path / "data" / n) for n in names]


def test_two_adapters_train_in_parallel_and_both_land(local_ray, tmp_path, tiny_model_dir):
    from loramux.training.distributed import train_adapters_ray

    lib = Library(tmp_path / "lib", create=True)
    specs = train_adapters_ray(str(tiny_model_dir), tasks(tmp_path, ["t1", "t2"]), lib, CFG, log=lambda s: None)
    assert sorted(s.name for s in specs) == ["t1", "t2"] == lib.names()
    assert all(lib.get(n).training.steps == 3 for n in lib.names()) and lib.verify() == []


def test_a_killed_worker_is_retried_and_the_library_stays_valid(local_ray, tmp_path, tiny_model_dir):
    from loramux.training.distributed import train_adapters_ray

    marker = tmp_path / "crashed-once"

    def crash_once(task_name):  # runs in the worker: the first attempt at t2 kills its process
        if task_name == "t2" and not marker.exists():
            marker.write_text("x")
            os._exit(1)

    lib = Library(tmp_path / "lib", create=True)
    specs = train_adapters_ray(str(tiny_model_dir), tasks(tmp_path, ["t1", "t2"]), lib, CFG, on_start=crash_once,
                               log=lambda s: None)
    assert marker.exists() and sorted(s.name for s in specs) == ["t1", "t2"] and lib.verify() == []


def test_failures_after_retries_are_reported(local_ray, tmp_path, tiny_model_dir):
    from loramux.training.distributed import train_adapters_ray

    def always(task_name):
        if task_name == "bad":
            raise RuntimeError("this task always fails")

    lib = Library(tmp_path / "lib", create=True)
    with pytest.raises(LoramuxError, match=r"1 of 2 adapters failed after 1 retries: \{'bad': .*always fails"):
        train_adapters_ray(str(tiny_model_dir), tasks(tmp_path, ["good", "bad"]), lib, CFG, on_start=always,
                           max_retries=1, log=lambda s: None)
    assert lib.names() == ["good"] and lib.verify() == []
