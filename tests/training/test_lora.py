import pytest
import torch

from loramux.data import load_task
from loramux.errors import LoramuxError
from loramux.evaluation import score_task
from loramux.library import Library
from loramux.models import load_base
from loramux.training import LoraTrainConfig, train_adapters, train_lora
from loramux.training.lora import STATE_FILE

from ..conftest import toy_mc_task

FAST = dict(rank=4, alpha=8, steps=30, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=0)


@pytest.fixture
def toy(tmp_path):
    return load_task(toy_mc_task(tmp_path / "toy" / "train.json"))


def test_training_learns_a_learnable_task(tiny_base, toy):
    before = score_task(tiny_base.model, tiny_base.tokenizer, toy, progress=False).score
    result = train_lora(tiny_base, toy, LoraTrainConfig(**FAST), progress=False)
    after = score_task(result.model, tiny_base.tokenizer, toy, progress=False).score
    assert result.losses[-1] < result.losses[0] / 3
    assert after == 1.0 and before < 1.0
    assert result.summary.steps == 30 and result.summary.examples == 24 and result.summary.data == "toy(24)"
    # only LoRA factors were trained; unload gives the untouched base back
    plain = result.model.unload()
    assert plain is tiny_base.model and not any("lora" in n for n, _ in plain.named_parameters())
    assert score_task(plain, tiny_base.tokenizer, toy, progress=False).score == before


def test_same_seed_same_run_other_seed_other_run(tiny_model_dir, toy):
    cfg = LoraTrainConfig(**{**FAST, "steps": 5})
    a = train_lora(load_base(str(tiny_model_dir)), toy, cfg, progress=False).losses
    b = train_lora(load_base(str(tiny_model_dir)), toy, cfg, progress=False).losses
    c = train_lora(load_base(str(tiny_model_dir)), toy, LoraTrainConfig(**{**FAST, "steps": 5, "seed": 1}), progress=False).losses
    assert a == b and a != c


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_resume_continues_exactly(tiny_model_dir, toy, tmp_path, monkeypatch):
    from peft import get_peft_model_state_dict

    cfg = LoraTrainConfig(**{**FAST, "steps": 6, "checkpoint_every": 2})
    straight = train_lora(load_base(str(tiny_model_dir)), toy, cfg, progress=False)

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash at step 5")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_lora(load_base(str(tiny_model_dir)), toy, cfg, checkpoint_dir=ckpt, progress=False)
    monkeypatch.undo()
    assert (ckpt / STATE_FILE).is_file()
    resumed = train_lora(load_base(str(tiny_model_dir)), toy, cfg, checkpoint_dir=ckpt, resume=True, progress=False)
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-5)
    a, b = get_peft_model_state_dict(straight.model), get_peft_model_state_dict(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    with pytest.raises(LoramuxError, match=r"cannot --resume .* different settings .*'lr'"):
        train_lora(load_base(str(tiny_model_dir)), toy, LoraTrainConfig(**{**FAST, "steps": 6, "lr": 1e-4}),
                   checkpoint_dir=ckpt, resume=True, progress=False)


def test_train_adapters_builds_a_library_one_adapter_per_task(tiny_base, tmp_path):
    tasks = [load_task(toy_mc_task(tmp_path / name / "train.json", n=8)) for name in ("t_a", "t_b")]
    lib = Library(tmp_path / "lib", create=True)
    cfg = LoraTrainConfig(**{**FAST, "steps": 2})
    specs = train_adapters(tiny_base, tasks, lib, cfg, progress=False, log=lambda s: None)
    assert [s.name for s in specs] == ["t_a", "t_b"] and [s.tasks for s in specs] == [("t_a",), ("t_b",)]
    assert lib.get("t_a").training.steps == 2 and lib.get("t_a").rank == 4
    assert not any("lora" in n for n, _ in tiny_base.model.named_parameters())  # base is clean again
    logs = []
    again = train_adapters(tiny_base, tasks, lib, cfg, skip_existing=True, progress=False, log=logs.append)
    assert [s.version for s in again] == [1, 1] and all("skipped" in line for line in logs)
    assert lib.verify(tiny_base) == []


def test_bad_target_modules(tiny_base, toy):
    with pytest.raises(LoramuxError, match=r"--target-modules \['c_attn'\] are not linear layers"):
        train_lora(tiny_base, toy, LoraTrainConfig(target_modules=("q_proj", "c_attn")), progress=False)
    with pytest.raises(LoramuxError, match=r"embed_tokens is an Embedding; loramux adapts nn.Linear only"):
        train_lora(tiny_base, toy, LoraTrainConfig(target_modules=("q_proj", "embed_tokens")), progress=False)


def test_auto_targets_every_projection_of_the_blocks(tiny_base, toy):
    result = train_lora(tiny_base, toy, LoraTrainConfig(target_modules=("auto",), steps=1, warmup_steps=0,
                                                           checkpoint_every=0),
                        progress=False)
    assert sorted(result.model.peft_config["default"].target_modules) == sorted(tiny_base.projection_names())
    result.model.unload()


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "--rank must be a positive integer"),
    ({"steps": -1}, "--steps must be a positive integer"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
    ({"warmup_steps": 100, "steps": 10}, r"--warmup-steps must be in \[0, --steps=10\]"),
    ({"target_modules": ()}, "--target-modules must name at least one module"),
])
def test_config_validation_names_the_flag(kwargs, match):
    with pytest.raises(LoramuxError, match=match):
        LoraTrainConfig(**kwargs)
