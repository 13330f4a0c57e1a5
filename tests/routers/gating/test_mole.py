import dataclasses
import math

import pytest
import torch

from loramux.engine import Engine, GenerationRequest, SamplingParams
from loramux.errors import LoramuxError
from loramux.fusion import FusedModel
from loramux.library import Library
from loramux.models import load_base
from loramux.routers import load_router
from loramux.routers.gating import (CheckpointOtherRecipe, CheckpointPastCap, MoleConfig, MoleGates, MoleRouter,
                                    MoleTrainConfig, balance_loss, gated_modules, out_widths, split_validation,
                                    task_owners, train_mole, unit_of)

from ...conftest import toy_mc_task
from ...library.conftest import make_peft_dir

NAMES = ["a", "b", "c"]


@pytest.fixture
def lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for i, n in enumerate(NAMES):
        lib.add(n, make_peft_dir(tiny_base, tmp_path / n, targets=("q_proj", "v_proj", "down_proj"), seed=i),
                base=tiny_base, tasks=[f"task_{n}"])
    return lib


def fused_for(model_dir, lib):
    fused = FusedModel(load_base(str(model_dir)))
    for n in NAMES:
        fused.load(lib, n)
    return fused


def router_for(fused, granularity, seed=0, gate_input="outputs", **kw):
    torch.manual_seed(seed)
    gates = MoleGates(gated_modules(fused), 3, MoleConfig(granularity, gate_input=gate_input), out_widths(fused))
    for p in gates.projs:  # random, not the uniform start, so the weights differ by input
        torch.nn.init.normal_(p.weight, std=1.0)
    return MoleRouter(fused, gates, NAMES, **kw)


def padded_batch(tok, device):
    rows = [tok("one two three four five")["input_ids"], tok("x")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return rows, ids, mask


@pytest.mark.parametrize("gate_input", ["outputs", "input"])
@pytest.mark.parametrize("granularity, n_units", [("layer", 3 * 2), ("block", 2), ("network", 1)])
def test_gate_shapes_and_padding_invariance(tiny_model_dir, lib, granularity, n_units, gate_input):
    fused = fused_for(tiny_model_dir, lib)
    router = router_for(fused, granularity, gate_input=gate_input)
    # the tiny model has 2 blocks; all 7 projections are fused, 3 adapted (q, v, down): gates only there
    assert len(router.gates.units) == n_units
    rows, ids, mask = padded_batch(fused.base.tokenizer, fused.base.model.device)
    with torch.no_grad():
        batch = router.route_weights(ids, mask)
        alone = router.route_weights(torch.tensor([rows[1]]).to(ids), torch.ones(1, len(rows[1])).to(ids))
    for unit, w in batch.items():
        assert w.shape == (2, 3) and torch.allclose(w.sum(-1), torch.ones(2), atol=1e-6)
        assert torch.allclose(w[1], alone[unit][0], atol=1e-5)  # padding does not change a row's weights
    if granularity == "network":
        assert list(batch) == ["network"]


def test_units_by_granularity():
    m = "model.layers.7.mlp.down_proj"
    assert unit_of(m, "layer") == m and unit_of(m, "block") == "block.7" and unit_of(m, "network") == "network"
    with pytest.raises(LoramuxError, match="cannot tell the transformer block"):
        unit_of("encoder.proj", "block")
    with pytest.raises(LoramuxError, match="granularity must be one of"):
        MoleConfig("head")


@pytest.mark.parametrize("over", ["units", "pooled"])
def test_balance_loss_gradient_reaches_the_gates(tiny_model_dir, lib, over):
    fused = fused_for(tiny_model_dir, lib)
    router = router_for(fused, "block")
    _, ids, mask = padded_batch(fused.base.tokenizer, fused.base.model.device)
    router.collected = []
    with fused.mixture(router.layer_mixture(), attention_mask=mask):
        fused.base.model(input_ids=ids, attention_mask=mask)
    loss = balance_loss(router.collected, over=over)
    loss.backward()
    grads = [p.grad for p in router.gates.projs.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    detached = balance_loss([w.detach() for w in router.collected], over=over)  # what the public code does
    assert not detached.requires_grad  # ...a constant: no gradient at all
    # a short step (length 1e-3) down the gradient lowers the balance loss
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in router.gates.parameters() if p.grad is not None))
        for p in router.gates.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad / norm
    router.collected = []
    with torch.no_grad(), fused.mixture(router.layer_mixture(), attention_mask=mask):
        fused.base.model(input_ids=ids, attention_mask=mask)
    assert float(balance_loss(router.collected, over=over)) < float(loss.detach())


def test_masking_renormalises_the_rest(tiny_model_dir, lib):
    fused = fused_for(tiny_model_dir, lib)
    full, masked = router_for(fused, "layer"), router_for(fused, "layer", mask=("b",))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    for unit, module in full.gates.anchor.items():  # the same input at every unit
        x = torch.randn(2, 4, fused.layers[module].base.in_features)
        with torch.no_grad():
            w_full, w_masked = full.weights(unit, x, mask), masked.weights(unit, x, mask)
        keep = w_full[:, [0, 2]]
        assert torch.equal(w_masked[:, 1], torch.zeros(2))
        assert torch.allclose(w_masked[:, [0, 2]], keep / keep.sum(-1, keepdim=True), atol=1e-6)
    with pytest.raises(LoramuxError, match=r"cannot mask \['z'\]"):
        router_for(fused, "layer", mask=("z",))
    with pytest.raises(LoramuxError, match="leaves no adapter"):
        router_for(fused, "layer", mask=("a", "b", "c"))


def test_train_save_load_and_refuse_a_changed_library(tiny_model_dir, lib, tmp_path, tiny_base):
    from loramux.data import load_task

    for n in NAMES:
        toy_mc_task(tmp_path / "data" / f"task_{n}" / "train.json", n=8)
    tasks = [load_task(tmp_path / "data" / f"task_{n}") for n in NAMES]
    fused = fused_for(tiny_model_dir, lib)
    before = {k: v.clone() for k, v in fused.base.model.state_dict().items()}
    lora_before = fused.layers["model.layers.0.self_attn.q_proj"].lora_A.clone()
    router = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=3, batch_size=4, lr=0.1,
                                                      val_per_task=0, eval_every=1),
                        progress=False, log=lambda s: None)
    assert router.info["gate_params"] == router.gates.n_params and len(router.info["curve"]) == 3
    after = fused.base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base frozen
    assert torch.equal(fused.layers["model.layers.0.self_attn.q_proj"].lora_A, lora_before)  # LoRAs frozen
    assert any(float(p.detach().abs().sum()) > 0 for p in router.gates.projs.parameters())  # the gates learned
    router.save(lib)
    other = FusedModel(load_base(str(tiny_model_dir)))
    loaded = load_router(lib, "mole", fused=other)  # loads the adapters in the gates' order
    assert other.adapters == NAMES
    _, ids, mask = padded_batch(fused.base.tokenizer, fused.base.model.device)
    with torch.no_grad():
        a, b = router.route_weights(ids, mask), loaded.route_weights(ids, mask)
    assert all(torch.allclose(a[u], b[u]) for u in a)
    # a stored router names its weights for persistent score caches; the mask is part of the name
    assert router.cache_key is None and loaded.cache_key is not None
    masked = load_router(lib, "mole", fused=other, mask=("b",))
    assert masked.cache_key != loaded.cache_key and load_router(lib, "mole", fused=other).cache_key == loaded.cache_key
    lib.add("b", make_peft_dir(tiny_base, tmp_path / "b2", targets=("q_proj", "v_proj", "down_proj"), seed=9),
            base=tiny_base, tasks=["task_b"], replace=True)
    with pytest.raises(LoramuxError, match=r"replaced \['b'\]"):
        load_router(lib, "mole", fused=FusedModel(load_base(str(tiny_model_dir))))


def test_generation_uses_the_prompts_gate_weights(tiny_model_dir, lib):
    engine = Engine(load_base(str(tiny_model_dir)), lib)
    for n in NAMES:
        engine.load(n)
    router = router_for(engine.fused, "layer")
    prompts = ["one two three", "The quick brown fox"]
    results = engine.generate([GenerationRequest(p, sampling=SamplingParams(max_new_tokens=5)) for p in prompts],
                              router=router)
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([engine.formatter.encode_prompt(prompt)], device=engine.base.model.device)
        with torch.no_grad(), engine.fused.mixture(router.layer_mixture(), attention_mask=torch.ones_like(ids)):
            first = int(engine.base.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        assert result.token_ids[0] == first
        assert result.routing.router == "mole" and len(result.routing.layers) == len(router.gates.units)
    assert router._frozen is None  # released after generation


def test_outputs_gate_is_the_papers_gate_on_the_mean_over_tokens(tiny_model_dir, lib):
    """The paper's gate reads every LoRA's output E_i(x), normalised, concatenated and projected.
    Over a prompt, the mean of E_i(x_t) over its real tokens equals E_i of the mean x (a LoRA is
    linear), which is what the gate computes: checked against per-token dense outputs."""
    fused = fused_for(tiny_model_dir, lib)
    router = router_for(fused, "layer")
    module = "model.layers.1.mlp.down_proj"
    layer, i = fused.layers[module], router.gates.index[module]
    x = torch.randn(2, 5, layer.base.in_features)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = router.gates.logits(module, x, mask, layer)
        rows = []
        for b in range(2):
            real = x[b, mask[b].bool()]  # (t, d_in)
            outs = [(layer.scaling[k] * real @ (layer.lora_B[k] @ layer.lora_A[k]).T).mean(0) for k in range(3)]
            h = torch.cat([router.gates.norms[i](o) for o in outs])
            rows.append(router.gates.projs[i](h) / router.gates.log_tau[i].exp())
    assert torch.allclose(got, torch.stack(rows), atol=1e-5)
    assert router.gates.projs[i].in_features == 3 * layer.base.out_features


def test_balance_over_recent_batches():
    """With more adapters than a batch has rows, a per-batch balance loss punishes routing itself;
    the running mean asks balance of the traffic, and its current batch still carries a gradient."""
    peaky = [torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], requires_grad=True)]  # 2 rows, 4 adapters
    alone = balance_loss(peaky)
    assert float(alone) > 30  # q = (.5, .5, 0, 0): two adapters unused in this batch
    memory = torch.full((4,), 0.25)
    loss, new = balance_loss(peaky, memory, 0.9)
    assert float(loss) < 6 and torch.allclose(new, 0.9 * memory + 0.1 * torch.tensor([0.5, 0.5, 0, 0]))
    loss.backward()
    assert peaky[0].grad is not None and float(peaky[0].grad.abs().sum()) > 0
    assert not new.requires_grad


def _toy_tasks(tmp_path, n=12):
    from loramux.data import load_task

    for name in NAMES:
        toy_mc_task(tmp_path / "data" / f"task_{name}" / "train.json", n=n)
    return [load_task(tmp_path / "data" / f"task_{name}") for name in NAMES]


def test_validation_split_is_seeded_and_held_out(tmp_path):
    tasks = _toy_tasks(tmp_path)
    train, val = split_validation(tasks, 2, 0)
    assert len(val) == 6 and len(train) == 30 and not {id(e) for e in train} & {id(e) for e in val}
    assert [e.prompt for e in split_validation(tasks, 2, 0)[1]] == [e.prompt for e in val]
    assert split_validation(tasks, 7, 0)[1] == []  # too few examples to hold any out


def test_training_stops_when_the_validation_curve_is_flat_and_keeps_the_best(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    flat = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=50, batch_size=4, lr=0.0,
                                                    val_per_task=2, eval_every=2, patience=2),
                      progress=False, log=lambda s: None)
    # lr 0: the validation loss never improves after the first evaluation; 2 more and it stops
    assert flat.info["stopped"] == "flat" and flat.info["steps_run"] == 6 and flat.info["best_step"] == 2
    assert [c["step"] for c in flat.info["curve"]] == [2, 4, 6] and flat.info["val_examples"] == 6
    assert all(c["val_task_loss"] == flat.info["curve"][0]["val_task_loss"] for c in flat.info["curve"])
    learned = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=6, batch_size=4, lr=0.05,
                                                       val_per_task=2, eval_every=2, patience=5),
                         progress=False, log=lambda s: None)
    assert learned.info["stopped"] == "steps" and learned.info["steps_run"] == 6
    best = min(learned.info["curve"], key=lambda c: c["val_task_loss"])
    assert learned.info["best_step"] == best["step"]  # the kept gates are the best evaluation's
    none = train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=3, batch_size=4, val_per_task=0,
                                                    eval_every=1), progress=False, log=lambda s: None)
    assert none.info["steps_run"] == 3 and "val_task_loss" not in none.info["curve"][0]


def test_a_router_stored_before_the_papers_gating_still_loads(tiny_model_dir, lib, tmp_path, monkeypatch):
    import dataclasses
    import json

    from loramux.routers.gating import router as router_module

    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    old = train_mole(fused, tasks, MoleTrainConfig(granularity="block", gate_input="input", steps=2, batch_size=4,
                                                   lr=0.1, val_per_task=0), progress=False, log=lambda s: None)
    # what routers stored before gate_input existed hold: no such key in their gates' config
    monkeypatch.setattr(router_module, "asdict", lambda c: {k: v for k, v in dataclasses.asdict(c).items()
                                                             if k != "gate_input"})
    d = old.save(lib)
    monkeypatch.undo()
    assert "gate_input" not in json.loads((d / "router.json").read_text())["gates"]
    loaded = load_router(lib, "mole", fused=fused)
    assert loaded.gates.config.gate_input == "input"
    _, ids, mask = padded_batch(fused.base.tokenizer, fused.base.model.device)
    with torch.no_grad():
        a, b = old.route_weights(ids, mask), loaded.route_weights(ids, mask)
    assert all(torch.allclose(a[u], b[u]) for u in a)


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_gates(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="block", steps=4, batch_size=4, lr=0.05, val_per_task=2, eval_every=2,
                             patience=5)
    whole = train_mole(fused, tasks, config, progress=False, log=lambda s: None)

    class Stop(Exception):
        pass

    def stop_at_step_4(msg):
        if msg.startswith("mole step 4"):
            raise Stop  # after step 2's checkpoint, before step 4's
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        train_mole(fused, tasks, config, progress=False, log=stop_at_step_4, checkpoint_dir=ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["mole-2.safetensors", "state.json"]
    messages = []
    resumed = train_mole(fused, tasks, config, progress=False, log=messages.append, checkpoint_dir=ckpt, resume=True)
    assert messages[0].startswith("mole: resuming at step 2")
    assert [c["step"] for c in resumed.info["curve"]] == [2, 4] and resumed.info["curve"] == whole.info["curve"]
    a, b = whole.gates.state_dict(), resumed.gates.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(CheckpointOtherRecipe, match=r"cannot resume MoLE training .* its \['config.lr', 'config.patience'\] "
                                           r"differ"):
        train_mole(fused, tasks, MoleTrainConfig(granularity="block", steps=5, batch_size=4, val_per_task=2,
                                                 eval_every=2), progress=False, log=lambda s: None,
                   checkpoint_dir=ckpt, resume=True)
    # the step count is a cap: a finished run goes on under a higher one, to the gates of a run that had it
    longer = dataclasses.replace(config, steps=6)
    extended = train_mole(fused, tasks, longer, progress=False, log=lambda s: None, checkpoint_dir=ckpt, resume=True)
    at_once = train_mole(fused, tasks, longer, progress=False, log=lambda s: None)
    assert [c["step"] for c in extended.info["curve"]] == [2, 4, 6] and extended.info["curve"] == at_once.info["curve"]
    a, b = at_once.gates.state_dict(), extended.gates.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(CheckpointPastCap, match="at step 6, past this run's cap of 4 steps"):
        train_mole(fused, tasks, config, progress=False, log=lambda s: None, checkpoint_dir=ckpt, resume=True)


def test_balance_per_unit_penalises_gates_that_ignore_the_input():
    """Two units, each one-hot on its own adapter whatever the row: pooled over units, q is
    uniform and the loss is at its minimum; per unit, each unit uses one adapter of two and the
    loss is high. Gates that route (each unit's pick following the row) are at the minimum both ways."""
    fixed = [torch.tensor([[1.0, 0], [1.0, 0]]), torch.tensor([[0, 1.0], [0, 1.0]])]  # unit -> (rows, K)
    routed = [torch.tensor([[1.0, 0], [0, 1.0]]), torch.tensor([[0, 1.0], [1.0, 0]])]
    floor = -2 * math.log(0.5)
    assert float(balance_loss(fixed, over="pooled")) == pytest.approx(floor)
    assert float(balance_loss(fixed, over="units")) > 10
    for over in ("pooled", "units"):
        assert float(balance_loss(routed, over=over)) == pytest.approx(floor)
    memory = torch.full((2,), 0.5)  # the (K,) start broadcasts to one running q per unit
    loss, new = balance_loss(fixed, memory, 0.5, over="units")
    assert new.shape == (2, 2) and torch.allclose(new, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert float(loss) == pytest.approx(-(math.log(0.75) + math.log(0.25)))
    with pytest.raises(LoramuxError, match="balance_over"):
        MoleTrainConfig(balance_over="layers")


def test_route_loss_reads_each_rows_own_adapter_and_skips_rows_without_one():
    from loramux.routers.gating.train import route_loss

    w1 = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], requires_grad=True)
    w2 = torch.tensor([[0.2, 0.4, 0.4], [0.3, 0.3, 0.4]], requires_grad=True)
    loss = route_loss([w1, w2], torch.tensor([0, -1]))  # row 1's task has no adapter among the gated
    assert math.isclose(float(loss), -(math.log(0.5) + math.log(0.2)) / 2, rel_tol=1e-6)
    loss.backward()
    assert float(w1.grad[0, 0]) < 0 and float(w1.grad[1].abs().sum()) == 0
    assert float(route_loss([w1, w2], torch.tensor([-1, -1]))) == 0.0


def test_the_routing_term_moves_each_units_weight_to_the_tasks_own_adapter(tiny_model_dir, lib, tmp_path):
    from loramux.data import load_task

    from ...conftest import write_task_json

    # three tasks a gate can tell apart by their words; six of them, so that they and not the chat
    # template's tokens carry the prompt's pooled input
    for i, name in enumerate(NAMES):
        words = [["red", "green", "blue"], ["cat", "dog", "cow"], ["seven", "eight", "nine"]][i]
        write_task_json(tmp_path / "data" / f"task_{name}" / "train.json",
                        [{"input": " ".join(words[(j + k) % 3] for k in range(6)),
                          "target_scores": {"yes": j % 2, "no": 1 - j % 2}}
                         for j in range(12)], append_choices_to_input=False, example_input_prefix="",
                        example_output_prefix="\nAnswer: ")
    tasks = [load_task(tmp_path / "data" / f"task_{n}") for n in NAMES]
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="block", steps=16, batch_size=6, lr=0.01, val_per_task=2, eval_every=4,
                             patience=5, route_alpha=1.0)
    with pytest.raises(LoramuxError, match="needs owners"):
        train_mole(fused, tasks, config, progress=False, log=lambda s: None)
    with pytest.raises(LoramuxError, match="no training task has an owner"):
        train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners={"elsewhere": "a"})
    owners = task_owners(lib)
    assert owners == {f"task_{n}": n for n in NAMES}
    router = train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners=owners)
    curve = router.info["curve"]
    assert all("route_loss" in c and "val_own_top_share" in c for c in curve)
    # a tiny random model: the share is noisy step to step, so ask for twice chance (1/3), not 1.0
    assert curve[-1]["route_loss"] < 0.6 * curve[0]["route_loss"] and curve[-1]["val_own_top_share"] >= 2 / 3
    plain = train_mole(fused, tasks, dataclasses.replace(config, route_alpha=0.0), progress=False, log=lambda s: None)
    assert "route_loss" not in plain.info["curve"][0] and "val_own_top_share" not in plain.info["curve"][0]


def test_a_task_two_adapters_name_has_no_single_owner(lib, tiny_base, tmp_path):
    lib.add("d", make_peft_dir(tiny_base, tmp_path / "d", targets=("q_proj",), seed=5), base=tiny_base,
            tasks=["task_a"])
    assert task_owners(lib) == {"task_b": "b", "task_c": "c"}


def test_a_run_that_stopped_flat_stays_stopped_under_a_higher_cap(tiny_model_dir, lib, tmp_path):
    tasks = _toy_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    config = MoleTrainConfig(granularity="block", steps=50, batch_size=4, lr=0.0, val_per_task=2, eval_every=2,
                             patience=2)
    ckpt = tmp_path / "ckpt"
    flat = train_mole(fused, tasks, config, progress=False, log=lambda s: None, checkpoint_dir=ckpt)
    assert flat.info["stopped"] == "flat" and flat.info["steps_run"] == 6
    again = train_mole(fused, tasks, dataclasses.replace(config, steps=80), progress=False, log=lambda s: None,
                       checkpoint_dir=ckpt, resume=True)
    # a fresh run with the higher cap stops where this one did: the resumed one trains no further
    assert again.info["stopped"] == "flat" and again.info["steps_run"] == 6 and again.info["curve"] == flat.info["curve"]
    cut = dataclasses.replace(config, steps=5, patience=9)  # a cap between evaluations writes a checkpoint at 5
    train_mole(fused, tasks, cut, progress=False, log=lambda s: None, checkpoint_dir=tmp_path / "cut")
    with pytest.raises(LoramuxError, match="written at step 5, an earlier cap that is not a multiple of eval_every=2"):
        train_mole(fused, tasks, dataclasses.replace(cut, steps=8), progress=False, log=lambda s: None,
                   checkpoint_dir=tmp_path / "cut", resume=True)


@pytest.mark.parametrize("gate_input", ["outputs", "input"])
def test_gates_over_a_fused_model_that_also_holds_the_general_adapter(tiny_model_dir, lib, tiny_base, tmp_path,
                                                                      gate_input):
    # the library's general adapter is loaded for the prompts routers abstain on, never gated: its
    # slot gets weight 0, the others exactly the weights (and outputs) they get without it, also
    # where it adapts a module (o_proj) that no gated adapter does
    lib.add("all", make_peft_dir(tiny_base, tmp_path / "all", targets=("q_proj", "v_proj", "down_proj", "o_proj"),
                                 seed=7, r=8), base=tiny_base)
    lib.set_general("all")
    alone = fused_for(tiny_model_dir, lib)
    router = router_for(alone, "layer", gate_input=gate_input)
    router.save(lib)
    both = FusedModel(load_base(str(tiny_model_dir)))
    loaded = load_router(lib, "mole", fused=both)  # loads the gated adapters, then the general one
    assert both.adapters == [*NAMES, "all"] and loaded.adapters == NAMES
    _, ids, mask = padded_batch(alone.base.tokenizer, alone.base.model.device)
    with torch.no_grad():
        a, b = router.route_weights(ids, mask), loaded.route_weights(ids, mask)
        assert all(torch.allclose(a[u], b[u], atol=1e-6) for u in a)
        outs = []
        for fused, r in ((alone, router), (both, loaded)):
            with r.recording(mask), fused.mixture(r.layer_mixture(), attention_mask=mask):
                outs.append(fused.base.model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert loaded.layer_mixture().slots == (0, 1, 2) and router.layer_mixture().slots is None
    with torch.no_grad(), loaded.recording(mask), both.mixture(loaded.layer_mixture(), attention_mask=mask,
                                                                reference=True):  # the general slot computed, at 0
        assert torch.allclose(outs[1], both.base.model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(LoramuxError, match=r"\['a', 'b', 'c'\] are not loaded"):
        MoleRouter(FusedModel(load_base(str(tiny_model_dir))), router.gates, NAMES)
    partial = FusedModel(load_base(str(tiny_model_dir)))
    partial.load(lib, "a")
    with pytest.raises(LoramuxError, match=r"gates adapters \['b', 'c'\] that are not loaded"):
        load_router(lib, "mole", fused=partial)
    # the gates in hand follow a load into their fused model: the new slot gets weight 0 too
    alone.load(lib, "all")
    with torch.no_grad():
        with router.recording(mask), alone.mixture(router.layer_mixture(), attention_mask=mask):
            again = alone.base.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(outs[0], again, atol=1e-5)
    alone.remove_adapter("b")
    with pytest.raises(LoramuxError, match=r"\['b'\] were unloaded"):
        router.slots()


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_training_gates_pool_the_prompt_alone_as_at_inference(tiny_model_dir, lib, granularity):
    from loramux.data import Example, PromptFormatter
    from loramux.routers.gating.train import _forward
    from loramux.training.batching import encode_for_training

    fused = fused_for(tiny_model_dir, lib)
    router = router_for(fused, granularity)
    fmt = PromptFormatter(fused.base.tokenizer)
    examples = [Example("one two three four five six", ("seven eight nine",)), Example("x", ("y",))]
    rows = [encode_for_training(fmt, e, 256) for e in examples]
    device = next(fused.base.model.parameters()).device
    _, trained = _forward(router, fused, router.layer_mixture(), rows, device, grad=False)
    for i, e in enumerate(examples):  # each prompt alone, as the engine's prefill sees it
        ids = torch.tensor([fmt.encode_prompt(e.prompt)], device=device)
        served = router.route_weights(ids, torch.ones_like(ids))
        for unit, w in zip(router.gates.units, trained):
            torch.testing.assert_close(w[i].float(), served[unit][0].float(), atol=2e-2, rtol=2e-2)
