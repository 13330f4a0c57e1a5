"""MoLE's inference sharpening, chosen on the held-out validation examples (gating/calibrate.py)."""

import pytest
import torch

from loramux.errors import LoramuxError
from loramux.routers import load_router
from loramux.routers.gating import MoleTrainConfig, calibrate_sharpen, train_mole
from loramux.routers.gating.train import _split_labelled, _validation_loss

from .test_mole import _toy_tasks, fused_for, lib  # noqa: F401 (fixture)


def test_the_factor_with_the_lowest_validation_loss_is_stored_with_the_gates(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    router = train_mole(fused, tasks, MoleTrainConfig(granularity="layer", steps=4, batch_size=4, lr=0.1,
                                                      val_per_task=2, eval_every=2),
                        progress=False, log=lambda s: None)
    assert router.sharpen == 1.0  # the trained gates as they are, until calibrated
    losses = calibrate_sharpen(router, tasks, (2.0, 4.0), log=lambda s: None)
    assert sorted(losses) == [1.0, 2.0, 4.0]  # 1.0 is always a candidate
    assert router.sharpen == min(losses, key=lambda f: (losses[f], f != 1.0))
    # the loss at the chosen factor is what the validation examples give under it
    _, val = _split_labelled(tasks, 2, 0)
    cfg = router.info["train_config"]
    from loramux.data import PromptFormatter
    from loramux.training.batching import LazyFeatures

    feats = LazyFeatures(PromptFormatter(fused.base.tokenizer), [e for e, _ in val], cfg["max_seq_len"])
    loss, _ = _validation_loss(router, fused, router.layer_mixture(), feats, [-1] * len(val), cfg["batch_size"],
                               next(fused.base.model.parameters()).device)
    assert loss == pytest.approx(losses[router.sharpen], abs=1e-4)
    router.sharpen = 2.0  # stored, read back, part of the prediction cache's key
    router.save(lib, "sharp")
    loaded = load_router(lib, "mole", name="sharp", fused=fused)
    assert loaded.sharpen == 2.0 and loaded.info["sharpen_curve"] and loaded.cache_key.endswith("|sharpen=2.0")
    loaded.sharpen = 1.0  # the key follows a calibration of loaded gates: no stale cached predictions
    assert "sharpen" not in loaded.cache_key
    with pytest.raises(LoramuxError, match="the tasks the gates were trained on"):
        calibrate_sharpen(router, tasks[:2], log=lambda s: None)
    assert router.sharpen == 2.0


def test_sharpen_scales_the_gate_logits(tiny_model_dir, lib, tmp_path):
    from .test_mole import router_for

    fused = fused_for(tiny_model_dir, lib)
    router = router_for(fused, "layer")
    unit = router.gates.units[0]
    x = torch.randn(2, 5, fused.base.model.config.hidden_size)
    plain = router.weights(unit, x, None)
    router.sharpen = 3.0
    sharp = router.weights(unit, x, None)
    logits = torch.log(plain)  # softmax(3 * logits) = softmax(3 * log softmax(logits))
    assert torch.allclose(sharp, torch.softmax(3.0 * logits, dim=-1), atol=1e-5)
    assert bool((sharp.max(-1).values >= plain.max(-1).values - 1e-6).all())  # more decisive
    masked = router_for(fused, "layer", mask=("b",))
    masked.sharpen = 3.0
    w = masked.weights(unit, x, None)
    assert bool((w[..., 1] == 0).all()) and torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)
    with pytest.raises(LoramuxError, match="finite number > 0"):
        router.sharpen = 0.0


def test_calibration_needs_validation_examples_and_a_positive_grid(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    none = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=1, batch_size=4, val_per_task=0),
                      progress=False, log=lambda s: None)
    with pytest.raises(LoramuxError, match="without held-out validation examples"):
        calibrate_sharpen(none, tasks, log=lambda s: None)
    some = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=2, batch_size=4, val_per_task=2,
                                                    eval_every=2), progress=False, log=lambda s: None)
    with pytest.raises(LoramuxError, match="factors > 0"):
        calibrate_sharpen(some, tasks, (0.0,), log=lambda s: None)


def test_a_routing_start_is_weighed_sharpened_against_the_kept_gates(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="layer", steps=4, batch_size=4, lr=0.1, val_per_task=2, eval_every=2)
    router = train_mole(fused, tasks, config, progress=False, log=lambda s: None)
    assert router.start is None  # no routing start: nothing else to weigh
    kept, kept_step = {k: v.clone() for k, v in router.gates.state_dict().items()}, str(router.info["best_step"])
    # a stand-in start: other gates (their projections moved), as train_mole leaves them in memory
    start = {k: v + (0.5 if "projs" in k else 0.0) for k, v in kept.items()}
    router.start = {k: v.clone() for k, v in start.items()}
    messages = []
    losses = calibrate_sharpen(router, tasks, (2.0, 4.0), log=messages.append)
    curves = router.info["sharpen_curves_by_step"]
    best_step = str(router.info["best_step"])
    assert set(curves) == {"0", kept_step} and curves[best_step] == {str(f): v for f, v in losses.items()}
    chosen = min(((s, f) for s in curves for f in curves[s]),
                 key=lambda sf: (curves[sf[0]][sf[1]], sf[0] != kept_step, sf[1] != "1.0"))
    assert (best_step, str(router.sharpen)) == chosen
    expect = start if chosen[0] == "0" else kept
    assert all(torch.equal(router.gates.state_dict()[k], expect[k]) for k in kept)
    assert (router.info.get("kept_by") == "sharpened validation") == (chosen[0] == "0")
    assert router.start is None and sum("(routing start)" in m for m in messages) == 3
    # a start identical to the kept gates ties everywhere: the trained gates stay
    router2 = train_mole(fused, tasks, config, progress=False, log=lambda s: None)
    kept_step2 = router2.info["best_step"]
    router2.start = {k: v.clone() for k, v in router2.gates.state_dict().items()}
    calibrate_sharpen(router2, tasks, (2.0,), log=lambda s: None)
    assert router2.info["best_step"] == kept_step2 and "kept_by" not in router2.info
    # gates kept at step 0 are the start: a start in hand is not scored as a second candidate
    router2.info["best_step"], router2.start = 0, {k: v + 1.0 for k, v in router2.gates.state_dict().items()}
    before = {k: v.clone() for k, v in router2.gates.state_dict().items()}
    calibrate_sharpen(router2, tasks, (2.0,), log=lambda s: None)
    assert "sharpen_curves_by_step" not in router2.info and router2.start is None
    assert all(torch.equal(before[k], v) for k, v in router2.gates.state_dict().items())
