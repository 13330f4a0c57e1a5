import json

import pytest
import torch

from loramux.data import load_task
from loramux.errors import LoramuxError
from loramux.fusion import FusedModel, FusionState, MultiLoraLinear, SequenceMixture
from loramux.library import Library
from loramux.models import load_base
from loramux.training import LoraTrainConfig
from loramux.training.dynamic import (DynamicConfig, DynamicLoraLinear, allocate, eject, export, inject, reallocate,
                                      train_dynamic)

from ..cli.test_cli import run
from ..conftest import toy_mc_task

CFG = LoraTrainConfig(rank=4, steps=6, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=0)


@pytest.mark.parametrize("importance, total, low, high, expected", [
    ([1, 1, 1, 1], 8, 1, 4, [2, 2, 2, 2]),
    ([3, 1, 0, 0], 8, 1, 4, [4, 2, 1, 1]),  # capped at high, the rest by weight, at least low
    ([0, 0, 0], 6, 0, 6, [2, 2, 2]),  # no signal: uniform
    ([10, 1], 4, 1, 8, [3, 1]),
])
def test_allocate(importance, total, low, high, expected):
    ranks = allocate(importance, total, low, high)
    assert ranks == expected and sum(ranks) == total


def test_allocate_refuses_an_impossible_budget():
    with pytest.raises(LoramuxError, match="cannot spread 20 ranks over 2 modules within"):
        allocate([1, 1], 20, 1, 8)


def test_reallocation_conserves_each_groups_budget(tiny_base):
    layers = inject(tiny_base.model, CFG, DynamicConfig())
    try:
        torch.manual_seed(0)
        for layer in layers.values():
            layer.importance.copy_(torch.rand_like(layer.importance) * layer.mask)
        list(layers.values())[0].importance.mul_(100)  # one clearly important module
        reallocate(layers, CFG.rank, DynamicConfig())
        kinds = {n.rsplit(".", 1)[-1] for n in layers}
        for kind in kinds:
            group = [l.rank for n, l in layers.items() if n.endswith(kind)]
            assert sum(group) == CFG.rank * len(group)
        first = list(layers.values())[0]
        assert first.rank == 2 * CFG.rank - 1  # grew; the other q_proj keeps min_rank 1 (2 layers share 8)
        files, _ = export(layers, CFG, DynamicConfig())
        lora = sum(t.numel() for k, t in files.tensors.items() if ".lora_A." in k or ".lora_B." in k)
        plain = sum(CFG.rank * (l.base.in_features + l.base.out_features) for l in layers.values())
        assert lora == plain  # same parameter count as the plain LoRA
    finally:
        eject(tiny_base.model, layers)


def test_step_zero_equals_plain_lora(tiny_base):
    base = torch.nn.Linear(12, 10)
    layer = DynamicLoraLinear(base, rank=3, room=6, scaling=2.0, gate=True)
    with torch.no_grad():
        layer.lora_B.normal_()  # as if trained: the gate (zero-initialised) must still be exactly 1
    x = torch.randn(2, 5, 12)
    A, B = layer.lora_A[:3], layer.lora_B[:, :3]
    assert torch.allclose(layer(x), base(x) + 2.0 * (x @ A.T) @ B.T, atol=1e-6)
    assert layer.rank == 3


def test_fused_layer_applies_the_gate_like_training():
    torch.manual_seed(1)
    base = torch.nn.Linear(12, 10)
    dyn = DynamicLoraLinear(base, rank=4, room=8, scaling=0.5, gate=True)
    with torch.no_grad():
        dyn.lora_B.normal_()
        dyn.gate.weight.normal_()
        dyn.gate.bias.fill_(0.3)
        dyn.mask[[1, 5]] = torch.tensor([0.0, 1.0])  # a reallocated pattern: components 0, 2, 3, 5
    files, _ = export({"m": dyn}, LoraTrainConfig(rank=4, alpha=2.0), DynamicConfig())
    t = files.tensors
    fused = MultiLoraLinear(base, "m", FusionState())
    fused.add_slot(t["base_model.model.m.lora_A.weight"], t["base_model.model.m.lora_B.weight"], 0.5,
                   (t["base_model.model.m.lora_gate.weight"], t["base_model.model.m.lora_gate.bias"]))
    x = torch.randn(3, 4, 12)
    for reference in (False, True):
        fused.state.mixture, fused.state.reference = SequenceMixture(torch.tensor([[0]]), torch.tensor([[1.0]])), reference
        with torch.no_grad():
            assert torch.allclose(fused(x), dyn(x), atol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_train_export_and_load(tiny_model_dir, tmp_path, gate):
    toy_mc_task(tmp_path / "toy" / "train.json")
    task = load_task(tmp_path / "toy")
    base = load_base(str(tiny_model_dir))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    dyn = DynamicConfig(realloc_every=2, realloc_start=2, input_gate=gate)
    result = train_dynamic(base, task, CFG, dyn, progress=False)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # base restored
    assert len(set(result.ranks.values())) > 1  # ranks moved between layers
    assert result.summary.config["method"] == "dynamic" and result.summary.config["dynamic"]["ranks"] == result.ranks
    lib = Library(tmp_path / "lib", create=True)
    lib.add("toy", result.files, base=base, tasks=["toy"], training=result.summary)
    ids = torch.tensor([base.tokenizer("the word is two")["input_ids"]])
    fused = FusedModel(load_base(str(tiny_model_dir)))
    fused.load(lib, "toy")
    with torch.no_grad(), fused.mixture(fused.sequence_mixture([{"toy": 1.0}])):
        ours = fused.base.model(input_ids=ids).logits
    peft = lib.load_peft(load_base(str(tiny_model_dir)), "toy")  # PEFT reads rank/alpha patterns, ignores gates
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    diff = float((ours - theirs).abs().max())
    if gate:
        assert diff > 1e-4  # PEFT does not apply the input gate...
    else:
        assert diff <= 1e-4  # ...but without gates the exported LoRA is exactly PEFT's


def test_cli_train_dynamic(capsys, tmp_path, tiny_model_dir):
    toy_mc_task(tmp_path / "data" / "toy" / "train.json")
    lib = str(tmp_path / "lib")
    code, out, err = run(capsys, "train", "--task", "toy", "--data-dir", str(tmp_path / "data"), "-l", lib,
                         "--model", str(tiny_model_dir), "--method", "dynamic", "--steps", "4", "--rank", "2",
                         "--realloc-every", "1", "--warmup-steps", "1")
    assert code == 0, err
    assert "dynamic, 4 steps" in out and "allocation plot" in out
    png = out.rsplit("allocation plot ", 1)[1].strip()
    assert open(png, "rb").read(4) == b"\x89PNG"
    spec = Library(lib).get("toy")
    assert spec.training.config["method"] == "dynamic"
    config = json.loads((Library(lib).adapter_dir("toy") / "adapter_config.json").read_text())
    assert set(config["rank_pattern"]) == set(config["alpha_pattern"])
    code, _, err = run(capsys, "train", "--task", "toy", "--data-dir", str(tmp_path / "data"), "-l", lib,
                       "--method", "fancy")
    assert code == 2 and "--method must be 'lora' or 'dynamic'; got 'fancy'" in err
