import dataclasses

import pytest
import torch

from loramux.data import PromptFormatter, load_task
from loramux.routers.gating import MoleConfig, MoleGates, MoleTrainConfig, gated_modules, out_widths, task_owners, train_mole
from loramux.routers.gating.route_init import fit_gates, record_pooled, sample_owned

from ...conftest import write_task_json
from .test_mole import NAMES, fused_for, lib  # noqa: F401  (lib: the fixture)

WORDS = [["red", "green", "blue"], ["cat", "dog", "cow"], ["seven", "eight", "nine"]]


def word_tasks(tmp_path, n=12):
    """Three tasks a gate can tell apart by their words (test_mole's routing-term test)."""
    for i, name in enumerate(NAMES):
        write_task_json(tmp_path / "data" / f"task_{name}" / "train.json",
                        [{"input": " ".join(WORDS[i][(j + k) % 3] for k in range(6)),
                          "target_scores": {"yes": j % 2, "no": 1 - j % 2}} for j in range(n)],
                        append_choices_to_input=False, example_input_prefix="", example_output_prefix="\nAnswer: ")
    return [load_task(tmp_path / "data" / f"task_{n}") for n in NAMES]


def gates_for(fused):
    return MoleGates(gated_modules(fused), len(NAMES), MoleConfig("layer"), out_widths(fused))


def test_sample_owned_is_seeded_per_task_and_skips_unowned():
    labelled = [(None, t) for t in ["x"] * 5 + ["y"] * 5 + ["z"] * 3]
    own = [0] * 5 + [1] * 5 + [-1] * 3
    picked = sample_owned(labelled, own, 2, seed=0)
    assert len(picked) == 4 and {labelled[i][1] for i in picked} == {"x", "y"}
    assert picked == sample_owned(labelled, own, 2, seed=0) and len(sample_owned(labelled, own, 9, 0)) == 10


def test_recorded_inputs_are_each_prompts_own_whatever_the_batch(tiny_model_dir, lib):
    fused = fused_for(tiny_model_dir, lib)
    fmt = PromptFormatter(fused.base.tokenizer)
    prompts = [fmt.encode_prompt(p) for p in ["a longer prompt with more words", "short", "mid length one"]]
    own = [2, 0, 1]
    gates = gates_for(fused)
    together = record_pooled(gates, fused, prompts, own, batch_size=3)
    for i, p in enumerate(prompts):  # alone, unpadded: the padded batch and its reordering change nothing
        alone = record_pooled(gates, fused, [p], [own[i]], batch_size=1)
        for u in gates.units:
            torch.testing.assert_close(together[u][i], alone[u][0], atol=2e-2, rtol=2e-2)
    # the own adapter is what runs: another adapter gives the later units other inputs
    other = record_pooled(gates, fused, prompts[:1], [0], batch_size=1)
    last = gates.units[-1]
    assert not torch.allclose(other[last][0], together[last][0])


def test_fitted_gates_route_held_out_prompts_to_their_own_adapter(tiny_model_dir, lib, tmp_path):
    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    fmt = PromptFormatter(fused.base.tokenizer)
    train = [(e, t.name, k) for k, t in enumerate(tasks) for e in t.examples[:8]]
    held = [(e, t.name, k) for k, t in enumerate(tasks) for e in t.examples[8:]]
    gates = gates_for(fused)

    def recorded(rows):
        return record_pooled(gates, fused, [fmt.encode_prompt(e.prompt) for e, _, _ in rows], [k for *_, k in rows], 6)

    share = fit_gates(gates, fused, recorded(train), torch.tensor([k for *_, k in train]))
    assert set(share) == set(gates.units) and sum(share.values()) / len(share) >= 0.9
    pooled, y = recorded(held), torch.tensor([k for *_, k in held])
    with torch.no_grad():
        hits = [float((gates.logits(u, pooled[u][:, None, :].to(gates.log_tau.device), None,
                                    fused.layers[gates.anchor[u]]).argmax(-1).cpu() == y).float().mean())
                for u in gates.units]
    assert sum(hits) / len(hits) >= 2 / 3  # twice chance on prompts the fit never saw


def test_the_fit_standardises_and_folds_back_into_the_gate_whatever_its_temperature():
    """Inputs that share a large common part and differ in a small one (as pooled prompts sharing a
    chat template do): the fit routes them, and the gate's own forward (LayerNorm, projection, τ)
    gives the logits fitted on standardised features, whatever τ the gate starts with."""
    g = torch.Generator().manual_seed(0)
    n, d = 60, 16
    y = torch.arange(n) % 3
    common = torch.randn(d, generator=g) * 10
    x = common + 0.05 * torch.randn(n, d, generator=g)
    x[torch.arange(n), y] += 0.3  # the class is a small shift along one feature
    fused = type("Fused", (), {"layers": {"m": None}})()

    def fitted(temperature):
        gates = MoleGates({"m": d}, 3, MoleConfig("layer", init_temperature=temperature, gate_input="input"))
        share = fit_gates(gates, fused, {"m": x}, y)
        with torch.no_grad():
            return share["m"], gates.logits("m", x[:, None, :], None)

    share, logits = fitted(1.0)
    assert share >= 0.95
    share_hot, logits_hot = fitted(2.5)
    assert share_hot == share
    torch.testing.assert_close(logits_hot, logits, atol=1e-4, rtol=1e-4)
    one = MoleGates({"m": d}, 3, MoleConfig("layer", gate_input="input"))
    assert fit_gates(one, fused, {"m": x[:1]}, y[:1])["m"] == 1.0  # one prompt: no spread, still finite
    assert all(bool(p.isfinite().all()) for p in one.parameters())


def test_training_from_a_routing_start_scores_it_first_and_keeps_it_when_nothing_beats_it(tiny_model_dir, lib,
                                                                                           tmp_path):
    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    owners = task_owners(lib)
    config = MoleTrainConfig(granularity="layer", steps=40, batch_size=6, lr=0.0, val_per_task=2, eval_every=2,
                             patience=2, route_init_per_task=8)
    with pytest.raises(Exception, match="needs owners"):
        train_mole(fused, tasks, config, progress=False, log=lambda s: None)
    router = train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners=owners)
    start = router.info["curve"][0]
    assert start["step"] == 0 and start["route_init"]["prompts"] == 3 * 8 and "val_task_loss" in start
    # lr 0: the main loop never moves the gates, so the routing start is the best and is kept
    assert router.info["best_step"] == 0 and router.info["stopped"] == "flat" and router.info["steps_run"] == 4
    assert router.info["gate_pool"] == "prompt" and router.start is None  # the start is what was kept
    plain = train_mole(fused, tasks, dataclasses.replace(config, route_init_per_task=0), progress=False,
                       log=lambda s: None)
    assert start["val_own_top_share"] > 1 / 3 and plain.info["curve"][0]["step"] == 2
    # each prompt of the start in two formats: twice the prompts, the same examples
    two = train_mole(fused, tasks, dataclasses.replace(config, steps=0, route_init_formats=("own", "raw")),
                     progress=False, log=lambda s: None, owners=owners)
    assert two.info["curve"][0]["route_init"]["prompts"] == 3 * 8 * 2
    assert list(two.info["train_config"]["route_init_formats"]) == ["own", "raw"]


def test_a_run_stopped_after_its_routing_start_resumes_from_it_without_fitting_again(tiny_model_dir, lib, tmp_path,
                                                                                     monkeypatch):
    import json

    monkeypatch.setattr("loramux.routers.gating.route_init.FIT_STEPS", 10)

    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    owners = task_owners(lib)
    config = MoleTrainConfig(granularity="block", steps=4, batch_size=6, lr=0.01, val_per_task=2, eval_every=2,
                             patience=5, route_init_per_task=4)
    whole = train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners=owners)

    class Stop(Exception):
        pass

    def stop_at_step_2(msg):
        if msg.startswith("mole step 2"):
            raise Stop  # after the routing start's checkpoint (step 0), before step 2's
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        train_mole(fused, tasks, config, progress=False, log=stop_at_step_2, checkpoint_dir=ckpt, owners=owners)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 0
    messages = []
    resumed = train_mole(fused, tasks, config, progress=False, log=messages.append, checkpoint_dir=ckpt, resume=True,
                         owners=owners)
    assert messages[0].startswith("mole: resuming at step 0") and not any("recording" in m for m in messages)
    def untimed(curve):
        return [{k: v for k, v in c.items() if k != "route_init"} | {"route_init": {
            k: v for k, v in (c.get("route_init") or {}).items() if not k.endswith("seconds")}} for c in curve]
    assert untimed(resumed.info["curve"]) == untimed(whole.info["curve"])
    a, b = whole.gates.state_dict(), resumed.gates.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the routing start is in the checkpoint: a resumed run still has it for calibrate_sharpen
    assert (whole.start is None) == (resumed.start is None) == (whole.info["best_step"] == 0)
    if whole.start is not None:
        assert all(torch.allclose(whole.start[k], resumed.start[k]) for k in whole.start)


def test_a_checkpoint_from_before_prompt_pooling_is_another_recipe(tiny_model_dir, lib, tmp_path):
    import json

    from loramux.routers.gating import CheckpointOtherRecipe

    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="block", steps=2, batch_size=6, val_per_task=2, eval_every=2)
    ckpt = tmp_path / "ckpt"
    train_mole(fused, tasks, config, progress=False, log=lambda s: None, checkpoint_dir=ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    del state["gate_pool"]  # as written before the gates pooled the prompt alone in training
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointOtherRecipe, match="gate_pool"):
        train_mole(fused, tasks, dataclasses.replace(config, steps=4), progress=False, log=lambda s: None,
                   checkpoint_dir=ckpt, resume=True)


def test_the_routing_start_alone_is_zero_steps_and_zero_steps_needs_it(tiny_model_dir, lib, tmp_path, monkeypatch):
    from loramux.errors import LoramuxError

    monkeypatch.setattr("loramux.routers.gating.route_init.FIT_STEPS", 10)
    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    router = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=0, batch_size=6, val_per_task=2,
                                                      route_init_per_task=4),
                        progress=False, log=lambda s: None, owners=task_owners(lib))
    assert router.info["steps_run"] == 0 and router.info["best_step"] == 0 and len(router.info["curve"]) == 1
    with pytest.raises(LoramuxError, match="0 only with route_init_per_task"):
        MoleTrainConfig(steps=0)


def test_the_routing_start_outlives_a_resume_when_later_gates_are_kept(tiny_model_dir, lib, tmp_path, monkeypatch):
    import itertools

    monkeypatch.setattr("loramux.routers.gating.route_init.FIT_STEPS", 2)
    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="layer", steps=4, batch_size=6, lr=0.01, val_per_task=2, eval_every=2,
                             route_init_per_task=2)

    def falling(calls):  # every evaluation better than the last: the last step is kept, not the start
        return lambda *a, **k: (1.0 - 0.1 * next(calls), None)

    monkeypatch.setattr("loramux.routers.gating.train._validation_loss", falling(itertools.count()))
    whole = train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners=task_owners(lib))
    assert whole.info["best_step"] == 4 and whole.start is not None

    class Stop(Exception):
        pass

    def stop_at_step_2(msg):
        if msg.startswith("mole step 2"):
            raise Stop
    monkeypatch.setattr("loramux.routers.gating.train._validation_loss", falling(itertools.count()))
    with pytest.raises(Stop):
        train_mole(fused, tasks, config, progress=False, log=stop_at_step_2, checkpoint_dir=tmp_path / "ck",
                   owners=task_owners(lib))
    calls = itertools.count()
    next(calls)  # the step-0 evaluation ran before the stop
    monkeypatch.setattr("loramux.routers.gating.train._validation_loss", falling(calls))
    resumed = train_mole(fused, tasks, config, progress=False, log=lambda s: None, checkpoint_dir=tmp_path / "ck",
                         resume=True, owners=task_owners(lib))
    assert resumed.info["best_step"] == 4
    assert all(torch.allclose(whole.start[k], resumed.start[k], atol=1e-6) for k in whole.start)


def test_route_init_formats_are_names_and_mean_nothing_without_a_start():
    from loramux.errors import LoramuxError

    with pytest.raises(LoramuxError, match="sequence of format names"):
        MoleTrainConfig(route_init_per_task=4, route_init_formats="raw")
    with pytest.raises(LoramuxError, match="subset of"):
        MoleTrainConfig(route_init_per_task=4, route_init_formats=("other_template",))  # held out: never fitted
    assert MoleTrainConfig(route_init_per_task=4, route_init_formats=["own", "raw"]).route_init_formats == ("own", "raw")
    assert MoleTrainConfig(route_init_formats=("raw",)).route_init_formats == ("own",)  # no start: one recipe
