import json

import numpy as np
import pytest

from loramux.bench.speed import random_adapter, write_peft
from loramux.errors import LoramuxError
from loramux.library import Library
from loramux.library.clustering import ClusterConfig, Clustering, cluster_adapters, save_clustering, sparsify

from ..cli.test_cli import run
from ..conftest import toy_mc_task
from .conftest import make_peft_dir


def family_member(base, family: int, i: int, path):
    """An adapter = its family's direction + small noise: MBC must recover the families."""
    center, noise = random_adapter(base, 4, seed=100 + family), random_adapter(base, 4, seed=1000 + 10 * family + i)
    for key in center.tensors:
        center.tensors[key] = center.tensors[key] + 0.1 * noise.tensors[key]
    return write_peft(center, path)


@pytest.fixture
def families(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for family, members in enumerate([["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]):
        for i, name in enumerate(members):
            lib.add(name, family_member(tiny_base, family, i, tmp_path / name), base=tiny_base, tasks=[f"task_{name}"])
    return lib


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_recovers_constructed_families(families, sparsity):
    c = cluster_adapters(families, ClusterConfig(k=3, sparsity=sparsity))
    assert sorted(sorted(g) for g in c.members) == [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]
    S = np.array(c.similarity)
    assert np.allclose(np.diag(S), 1.0, atol=1e-5) and np.allclose(S, S.T)
    assert S[0, 1] > 0.9 and abs(S[0, 4]) < 0.5  # a0~a1 within a family, a0 vs b1 across
    assert c.tasks["b1"] == ["task_b1"]


def test_sparsify_zeroes_the_smallest_fraction():
    X = np.array([[0.1, -5.0, 0.3, 2.0], [4.0, -0.2, 0.05, -1.0]])
    assert sparsify(X, 0.5).tolist() == [[0.0, -5.0, 0.0, 2.0], [4.0, 0.0, 0.0, -1.0]]
    assert sparsify(X, 0.0).tolist() == X.tolist()


def test_save_and_load_round_trip(families, tmp_path):
    c = cluster_adapters(families, ClusterConfig(k=2))
    j, png = save_clustering(c, tmp_path / "out")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    back = Clustering.load(j)
    assert back.members == c.members and back.config == c.config and back.similarity == c.similarity
    with pytest.raises(LoramuxError, match="is not a clustering"):
        Clustering.load(png)


def test_bad_input(families, tiny_base, tmp_path):
    with pytest.raises(LoramuxError, match="k=9 clusters from 8 adapters"):
        cluster_adapters(families, ClusterConfig(k=9))
    with pytest.raises(LoramuxError, match="sparsity must be in"):
        ClusterConfig(k=2, sparsity=1.0)
    families.add("odd", make_peft_dir(tiny_base, tmp_path / "odd", r=2), base=tiny_base)
    with pytest.raises(LoramuxError, match="MBC compares adapters of one shape; 'odd' differs"):
        cluster_adapters(families, ClusterConfig(k=2))


def test_cluster_then_train_one_adapter_per_cluster(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    for name in ("toy_a", "toy_b", "toy_c"):
        toy_mc_task(data / name / "train.json")
    lib, cl = str(tmp_path / "lib"), str(tmp_path / "clib")
    common = ["--data-dir", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--warmup-steps", "1"]
    for name, steps in (("toy_a", "3"), ("toy_b", "2"), ("toy_c", "4")):
        code, _, err = run(capsys, "train", "--task", name, "-l", lib, "--steps", steps, *common)
        assert code == 0, err
    code, out, err = run(capsys, "library", "cluster", "--k", "2", "-l", lib, "--out", str(tmp_path / "mbc"))
    assert code == 0, err
    assert "cluster 0:" in out and "cluster 1:" in out
    clustering = json.loads((tmp_path / "mbc" / "clustering.json").read_text())
    code, out, err = run(capsys, "train", "--cluster", str(tmp_path / "mbc" / "clustering.json"), "-l", cl, *common)
    assert code == 0, err
    built = Library(cl)
    assert built.names() == ["cluster0", "cluster1"]
    for i, members in enumerate(clustering["members"]):
        spec = built.get(f"cluster{i}")
        assert sorted(spec.tasks) == sorted(members)  # each toy adapter was trained on its own task
        assert spec.training.steps == sum(clustering["steps"][m] for m in members)  # total steps matched
    assert sum(built.get(n).training.steps for n in built.names()) == 9


def test_cluster_plan_matches_steps_and_clamps_warmup(families):
    from loramux.training import LoraTrainConfig
    from loramux.training.build import cluster_plan

    c = cluster_adapters(families, ClusterConfig(k=3))
    c.steps = {"a0": 2, "a1": 1, "a2": 1, "b0": 60, "b1": None}  # c0..c2 unknown: the config's steps
    plan = cluster_plan(c, LoraTrainConfig(steps=30, warmup_steps=6, rank=4))
    by_tasks = {tuple(sorted(tasks)): cfg for _, tasks, cfg in plan}
    a, b, cc = (by_tasks[tuple(f"task_{p}{i}" for i in range(n))] for p, n in (("a", 3), ("b", 2), ("c", 3)))
    assert [p[0] for p in plan] == ["cluster0", "cluster1", "cluster2"]
    assert (a.steps, a.warmup_steps) == (4, 4)  # 2 + 1 + 1 steps: warm-up cut to fit
    assert (b.steps, b.warmup_steps) == (90, 6) and cc.steps == 90 and a.rank == 4
    fixed = cluster_plan(c, LoraTrainConfig(steps=5, warmup_steps=2), match_steps=False)
    assert {cfg.steps for _, _, cfg in fixed} == {5}
