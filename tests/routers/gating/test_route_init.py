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


def test_training_from_a_routing_start_scores_it_first_and_keeps_it_when_nothing_beats_it(tiny_model_dir, lib,
                                                                                           tmp_path):
    tasks = word_tasks(tmp_path)
    fused = fused_for(tiny_model_dir, lib)
    owners = task_owners(lib)
    config = MoleTrainConfig(granularity="layer", steps=40, batch_size=6, lr=0.0, val_per_task=2, eval_every=4,
                             patience=2, route_init_per_task=8)
    with pytest.raises(Exception, match="needs owners"):
        train_mole(fused, tasks, config, progress=False, log=lambda s: None)
    router = train_mole(fused, tasks, config, progress=False, log=lambda s: None, owners=owners)
    start = router.info["curve"][0]
    assert start["step"] == 0 and start["route_init"]["prompts"] == 3 * 8 and "val_task_loss" in start
    # lr 0: the main loop never moves the gates, so the routing start is the best and is kept
    assert router.info["best_step"] == 0 and router.info["stopped"] == "flat" and router.info["steps_run"] == 8
    assert router.info["gate_pool"] == "prompt"
    plain = train_mole(fused, tasks, dataclasses.replace(config, route_init_per_task=0), progress=False,
                       log=lambda s: None)
    assert start["val_own_top_share"] > 1 / 3 and plain.info["curve"][0]["step"] == 4
