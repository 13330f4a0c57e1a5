import pytest

from loramux.data import load_tasks
from loramux.evaluation.harness import EvalConfig, evaluate
from loramux.fusion import FusedModel
from loramux.models import load_base

from ..routers.sentence.conftest import bert_dir, task_dir, task_lib  # noqa: F401 (fixtures)
from .test_harness import routed_lib  # noqa: F401 (fixture)

ray = pytest.importorskip("ray")


def test_ray_cells_give_the_local_table(tiny_model_dir, routed_lib, task_dir):
    from loramux.evaluation.distributed import evaluate_ray

    task_lib = routed_lib
    config = EvalConfig(("base", "oracle", "uniform", "dlp"), limit_per_task=3, seed=2)
    local = evaluate(FusedModel(load_base(str(tiny_model_dir))), task_lib, load_tasks(task_dir, split="test"), config,
                     progress=False, log=lambda s: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spread = evaluate_ray(str(tiny_model_dir), str(task_lib.path), str(task_dir), sorted(local["n_per_task"]),
                              config, log=lambda s: None)
    finally:
        ray.shutdown()
    for s in config.strategies:
        assert spread["strategies"][s]["per_task"] == local["strategies"][s]["per_task"]
        assert spread["strategies"][s]["average"] == local["strategies"][s]["average"]
    assert spread["n_per_task"] == local["n_per_task"]
    assert spread["routing"] == local["routing"] and set(local["routing"]) == {"dlp"}
