import json

import pytest

from loramux.data import load_tasks
from loramux.errors import LoramuxError
from loramux.evaluation.harness import EvalConfig, evaluate, to_markdown
from loramux.fusion import FusedModel
from loramux.models import load_base
from loramux.routers.sentence import DlpTrainConfig, train_dlp

from ..cli.test_cli import run
from ..routers.sentence.conftest import WORDS, bert_dir, task_dir, task_lib  # noqa: F401 (fixtures)


@pytest.fixture
def routed_lib(task_lib, task_dir, bert_dir, tiny_model_dir):
    from loramux.routers.gating import MoleTrainConfig, train_mole

    train = load_tasks(task_dir, split="train")
    # own format, no abstain test: the word-level toy encoder maps other formats' words to [UNK]
    router = train_dlp(task_lib, train, DlpTrainConfig(encoder=str(bert_dir), hidden=(64,), max_epochs=60, patience=10,
                                                       lr=3e-3, batch_size=16, formats=("own",), abstain_recall=None),
                       progress=False, log=lambda s: None)
    router.save(task_lib)
    fused = FusedModel(load_base(str(tiny_model_dir)))
    for n in task_lib.names():
        fused.load(task_lib, n)
    train_mole(fused, train, MoleTrainConfig(steps=2, batch_size=4), progress=False, log=lambda s: None).save(task_lib)
    return task_lib


def test_strategies_side_by_side(tiny_model_dir, routed_lib, task_dir):
    tasks = load_tasks(task_dir, split="test")
    config = EvalConfig(("base", "oracle", "uniform", "dlp", "dlp_p1.0", "dlp_p1.0_open", "arrow", "mole"),
                        limit_per_task=4, seed=1)
    result = evaluate(FusedModel(load_base(str(tiny_model_dir))), routed_lib, tasks, config, progress=False,
                      log=lambda s: None)
    s = result["strategies"]
    assert list(s) == list(config.strategies) and result["n_per_task"] == dict.fromkeys(WORDS, 4)
    for v in s.values():
        assert set(v["per_task"]) == set(WORDS) and all(0 <= x <= 1 for x in v["per_task"].values())
        assert v["average"] == pytest.approx(sum(v["per_task"].values()) / 3, abs=1e-4)
        assert v["metric"] == dict.fromkeys(WORDS, "exact_str_match")
    for k, v in s.items():  # per-prompt outcomes, whose means are the task scores (exact match)
        assert {t: sum(c) / len(c) for t, c in result["correct"][k].items()} == pytest.approx(v["per_task"], abs=1e-4)
    assert s["dlp"]["per_task"] == s["oracle"]["per_task"]  # the router picks each task's own adapter
    routing = result["routing"]
    assert set(routing) == {"dlp", "dlp_p1.0", "dlp_p1.0_open"}  # only per-prompt routers have a confusion matrix
    assert s["dlp_p1.0_open"] == s["dlp_p1.0"] | {"seconds": s["dlp_p1.0_open"]["seconds"]}  # nothing to abstain on here
    assert routing["dlp"]["labels"] == result["adapters"] and routing["dlp"]["top1_accuracy"] == 1.0
    assert sorted(result["adapters"]) == sorted(WORDS)  # one adapter per task, named after it: diagonal
    assert routing["dlp"]["confusion"] == [[4 * (i == j) for j in range(3)] for i in range(3)]
    md = to_markdown(result)
    assert md.splitlines()[0].startswith("| strategy | average | animals (exact_str_match)")
    assert len(md.splitlines()) >= 2 + len(config.strategies)


def test_routing_confusion_counts_the_top_adapter_per_prompt():
    from loramux.evaluation.harness import routing_confusion

    owner = {"t1": "a", "t2": "b", "t3": "c"}
    plan = {("t1", 0): {"a": 0.7, "b": 0.3}, ("t1", 1): {"b": 0.6, "a": 0.4}, ("t2", 0): {"a": 0.5, "b": 0.5},
            ("t3", 0): {"c": 1.0}, ("t3", 1): None, ("unowned", 0): {"a": 1.0}, ("unowned", 1): None}
    r = routing_confusion(plan, owner, ["a", "b", "c"])
    assert r["abstained"] == 2  # every prompt sent to the base model, a task outside the library's too
    # the tie in t2 goes to the first adapter in library order; base (None) and unowned tasks are not counted
    assert r["confusion"] == [[1, 1, 0], [1, 0, 0], [0, 0, 1]] and r["top1_accuracy"] == 0.5
    # mixture sizes 2, 2, 2, 1 and 1 (the unowned task's too: it costs what it holds); the true
    # adapter's share 0.7, 0.4, 0.5, 1.0 over the 4 prompts that have a true adapter
    assert r["mean_adapters"] == 1.6 and r["mean_true_weight"] == 0.65
    # tasks outside the library alone (benchmarks/unseen.py): sizes still counted, no confusion
    r = routing_confusion({("x", 0): {"a": 0.5, "b": 0.5}, ("x", 1): {"c": 1.0}, ("x", 2): None}, owner, ["a", "b", "c"])
    assert r["mean_adapters"] == 1.5 and r["abstained"] == 1 and r["top1_accuracy"] == 0.0


def test_in_forward_routers_behind_the_out_of_library_test(tiny_model_dir, routed_lib, task_dir):
    from loramux.routers.sentence import Abstain, DlpRouter

    tasks = load_tasks(task_dir, split="test")
    fused = FusedModel(load_base(str(tiny_model_dir)))
    with pytest.raises(LoramuxError, match="out-of-library test, for the same adapters"):  # this one has none
        evaluate(fused, routed_lib, tasks, EvalConfig(("arrow_abstain",), limit_per_task=2), progress=False,
                 log=lambda s: None)
    router = DlpRouter.load(routed_lib)
    for threshold, same_as in ((-1e9, "base"), (1e9, "in-forward")):  # every prompt out of the library; none
        router.abstain = Abstain("energy", threshold, 0.95, 1)
        router.save(routed_lib)
        config = EvalConfig(("base", "arrow", "mole", "arrow_abstain", "mole_abstain"), limit_per_task=2, seed=1)
        result = evaluate(fused, routed_lib, tasks, config, progress=False, log=lambda s: None)
        s, c = result["strategies"], result["correct"]
        for kind in ("arrow", "mole"):
            assert c[f"{kind}_abstain"] == c["base" if same_as == "base" else kind]
            assert result["abstained"][f"{kind}_abstain"] == (6 if same_as == "base" else 0)
        assert set(s) == set(config.strategies) and "routing" not in result  # no per-prompt router here


def test_abstained_prompts_are_scored_with_the_general_adapter(tiny_model_dir, routed_lib, task_dir, tiny_base,
                                                               tmp_path):
    from loramux.routers.sentence import Abstain, DlpRouter

    from ..library.conftest import make_peft_dir

    router = DlpRouter.load(routed_lib)
    # a multi-task LoRA names every task it was trained on: it is still no task's own adapter
    routed_lib.add("general", make_peft_dir(tiny_base, tmp_path / "general", seed=5), base=tiny_base,
                   tasks=sorted(WORDS))
    routed_lib.set_general("general")  # the stored routers route between the others: still loadable
    router.abstain = Abstain("energy", -1e9, 0.95, 1)  # every prompt out of the library
    router.save(routed_lib)
    tasks = load_tasks(task_dir, split="test")
    config = EvalConfig(("oracle", "uniform", "dlp", "arrow_abstain", "mole_abstain"), limit_per_task=2, seed=1)
    result = evaluate(FusedModel(load_base(str(tiny_model_dir))), routed_lib, tasks, config, progress=False,
                      log=lambda s: None)
    routed_lib.set_general(None)  # the oracle is each task's own adapter, as without a general adapter
    routed_lib.remove("general")
    plain = evaluate(FusedModel(load_base(str(tiny_model_dir))), routed_lib, tasks,
                     EvalConfig(("oracle",), limit_per_task=2, seed=1), progress=False, log=lambda s: None)
    assert result["correct"]["oracle"] == plain["correct"]["oracle"]
    assert result["adapters"] == sorted(WORDS)  # the uniform mix and the confusion matrix leave it out
    assert result["routing"]["dlp"]["abstained"] == 6 and result["abstained"] == {"arrow_abstain": 6, "mole_abstain": 6}
    c = result["correct"]
    assert c["arrow_abstain"] == c["mole_abstain"] == c["dlp"]  # every prompt served by the general adapter


def test_bad_strategies():
    with pytest.raises(LoramuxError, match="unknown strategy 'best'"):
        EvalConfig(("best",))
    with pytest.raises(LoramuxError, match="the top-p after 'dlp_p' must be a number"):
        EvalConfig(("dlp_pX",))
    with pytest.raises(LoramuxError, match="unknown strategy 'mole_gates'"):
        EvalConfig(("mole_gates",))


def test_cli_eval(capsys, tiny_model_dir, task_lib, task_dir, tmp_path):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code, out, err = run(capsys, "eval", "-l", str(task_lib.path), "--data-dir", str(task_dir), "--model",
                         str(tiny_model_dir), "--strategies", "base,oracle", "--limit-per-task", "2", "-o",
                         str(out_json), "--markdown", str(out_md), "--plots", str(tmp_path / "png"))
    assert code == 0, err
    assert "| base |" in out and "| oracle |" in out
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["eval_heatmap.png"]  # no router, no sweep
    assert set(json.loads(out_json.read_text())["strategies"]) == {"base", "oracle"}
    assert out_md.read_text().startswith("| strategy |")


def test_cli_eval_cache_dir_reads_a_rerun_back(capsys, tiny_model_dir, task_lib, task_dir, tmp_path):
    args = ["eval", "-l", str(task_lib.path), "--data-dir", str(task_dir), "--model", str(tiny_model_dir),
            "--strategies", "base,oracle", "--limit-per-task", "2", "--cache-dir", str(tmp_path / "cache")]
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    code, _, err = run(capsys, *args, "-o", str(first))
    assert code == 0, err
    code, _, err = run(capsys, *args, "-o", str(second))
    assert code == 0, err
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["predictions_from_cache"] == 0 and b["predictions_from_cache"] == sum(b["n_per_task"].values()) * 2
    assert {k: v["per_task"] for k, v in a["strategies"].items()} == {k: v["per_task"] for k, v in b["strategies"].items()}
