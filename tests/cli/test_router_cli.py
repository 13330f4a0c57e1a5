"""`loramux router train`, `loramux route` and `loramux generate --router`, driven as a user would."""

import json

import pytest

from ..routers.sentence.conftest import bert_dir, task_dir, task_lib, task_prompts  # noqa: F401 (fixtures)
from .test_cli import run


@pytest.fixture
def trained_lib(capsys, task_lib, task_dir, bert_dir):
    code, out, err = run(capsys, "router", "train", "-l", str(task_lib.path), "--data", str(task_dir),
                         "--encoder", str(bert_dir), "--hidden", "64", "--lr", "3e-3", "--batch-size", "16",
                         "--max-epochs", "60", "--patience", "10")
    assert code == 0, err
    assert "router 'dlp' saved to" in out and "head 2,307 parameters" in out  # 32*64+64 + 64*3+3
    return task_lib


def test_route_prints_the_ranking_and_the_mixture(capsys, trained_lib):
    code, out, err = run(capsys, "route", task_prompts("numbers", 1, offset=1)[0], "-l", str(trained_lib.path))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("*") and lines[0].endswith("numbers")
    assert lines[-1].startswith("mixture: numbers=")
    code, out, _ = run(capsys, "route", "hello world zebra quantum", "-l", str(trained_lib.path), "--json")
    routing = json.loads(out)  # the stored out-of-library test, on by default
    assert routing["abstained"] and routing["adapters"] == [] and "no adapter fits: energy" in routing["reason"]
    code, out, _ = run(capsys, "route", "hello world zebra quantum", "-l", str(trained_lib.path), "--no-abstain",
                       "--max-distance", "0", "--json")
    routing = json.loads(out)  # the older distance test, still available
    assert routing["abstained"] and routing["adapters"] == [] and "max_distance 0.0" in routing["reason"]
    code, out, _ = run(capsys, "route", "hello world zebra quantum", "-l", str(trained_lib.path), "--no-abstain",
                       "--json")
    assert not json.loads(out)["abstained"]


def test_generate_with_the_router(capsys, trained_lib, tiny_model_dir):
    code, out, err = run(capsys, "generate", task_prompts("colors", 1)[0], "-l", str(trained_lib.path),
                         "--router", "dlp", "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0, err
    assert err.startswith("[dlp] colors=")


def test_router_errors(capsys, task_lib, task_dir, bert_dir):
    code, _, err = run(capsys, "route", "x", "-l", str(task_lib.path))
    assert code == 2 and "no router named 'dlp'" in err and "loramux router train" in err
    code, _, err = run(capsys, "router", "train", "--method", "moe", "-l", str(task_lib.path))
    assert code == 2 and "cannot train router method 'moe'; trainable: ['dlp', 'mole']" in err
    code, _, err = run(capsys, "router", "train", "--method", "arrow", "-l", str(task_lib.path))
    assert code == 2 and "arrow needs no training" in err
    code, _, err = run(capsys, "route", "x", "--router", "moe", "-l", str(task_lib.path))
    assert code == 2 and "unknown router method 'moe'; available: ['dlp', 'arrow', 'mole']" in err
    code, _, err = run(capsys, "router", "train", "-l", str(task_lib.path), "--data", str(task_dir),
                       "--encoder", str(bert_dir), "--hidden", "6x4")
    assert code == 2 and "--hidden '6x4' must be comma-separated integers" in err
    code, _, err = run(capsys, "generate", "x", "--mix", "a=1", "--router", "dlp")
    assert code == 2 and "give one of --adapter, --mix and --router" in err


def test_route_and_generate_with_arrow(capsys, task_lib, tiny_model_dir):
    code, out, err = run(capsys, "route", "one two three", "--router", "arrow", "-l", str(task_lib.path),
                         "--model", str(tiny_model_dir), "--top-k", "2", "--json")
    assert code == 0, err
    routing = json.loads(out)
    assert routing["router"] == "arrow" and routing["granularity"] == "token" and routing["layers"]
    assert set(routing["adapters"]) <= {"animals", "colors", "numbers"}
    assert sum(routing["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    code, out, err = run(capsys, "generate", "one two", "--router", "arrow", "-l", str(task_lib.path),
                         "--model", str(tiny_model_dir), "--max-new-tokens", "3")
    assert code == 0, err
    assert err.startswith("[arrow] per token over 3 adapters")
    code, _, err = run(capsys, "route", "x", "--router", "arrow", "--top-p", "0.5", "-l", str(task_lib.path),
                       "--model", str(tiny_model_dir))
    assert code == 2 and "DLP options" in err
    code, out, err = run(capsys, "route", "one two three", "--router", "arrow", "-l", str(task_lib.path),
                         "--model", str(tiny_model_dir), "--general", "numbers", "--json")
    assert code == 0, err
    routing = json.loads(out)
    assert "general knowledge subtracted" in routing["reason"] and "numbers" not in routing["adapters"]
    code, _, err = run(capsys, "route", "x", "--gks", "-l", str(task_lib.path), "--model", str(tiny_model_dir))
    assert code == 2 and "--gks and --general are Arrow options" in err


def test_mole_train_route_mask_plot_generate(capsys, task_lib, task_dir, tiny_model_dir, tmp_path):
    lib, model = str(task_lib.path), str(tiny_model_dir)
    code, out, err = run(capsys, "router", "train", "--method", "mole", "-l", lib, "--data", str(task_dir),
                         "--model", model, "--granularity", "block", "--steps", "2", "--batch-size", "4",
                         "--balance-over", "pooled", "--route-alpha", "1", "--val-per-task", "1",
                         "--route-init-per-task", "2", "--sharpen-grid", "1,2")
    assert code == 0, err
    assert "router 'mole' saved to" in out and "mole sharpen 2: validation answer loss" in out
    info = json.loads((task_lib.router_dir("mole") / "router.json").read_text())["info"]
    assert info["sharpen"] in (1.0, 2.0) and sorted(info["sharpen_curve"]) == ["1.0", "2.0"]
    assert info["train_config"]["balance_over"] == "pooled" and info["train_config"]["route_alpha"] == 1.0
    assert "route_loss" in info["curve"][-1]  # the term ran: every task has its adapter
    assert info["curve"][0]["step"] == 0 and info["curve"][0]["route_init"]["prompts"] >= 2  # the routing start
    code, _, err = run(capsys, "router", "train", "--method", "mole", "-l", lib, "--data", str(task_dir),
                       "--model", model, "--balance-over", "layers")
    assert code == 2 and "balance_over must be one of units, pooled; got 'layers'" in err
    code, _, err = run(capsys, "router", "train", "--method", "mole", "-l", lib, "--data", str(task_dir),
                       "--model", model, "--route-init-per-task", "-1")
    assert code == 2 and "route_init_per_task must be >= 0; got -1" in err
    code, _, err = run(capsys, "router", "train", "--method", "mole", "-l", lib, "--data", str(task_dir),
                       "--model", model, "--sharpen-grid", "2x")
    assert code == 2 and "--sharpen-grid '2x' must be comma-separated numbers" in err
    png = tmp_path / "gates.png"
    code, out, err = run(capsys, "route", "one two", "--router", "mole", "-l", lib, "--model", model, "--mask", "colors",
                         "--plot", str(png), "--json")
    assert code == 0, err
    routing = json.loads(out)
    assert routing["router"] == "mole" and routing["probabilities"]["colors"] == 0.0
    assert all(w["colors"] == 0.0 for w in routing["layers"].values()) and len(routing["layers"]) == 2  # 2 blocks
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(capsys, "generate", "one two", "--router", "mole", "--mask", "animals", "-l", lib,
                         "--model", model, "--max-new-tokens", "3")
    assert code == 0, err
    assert err.startswith("[mole] per layer over 3 adapters")
    code, _, err = run(capsys, "route", "x", "--router", "mole", "--mask", "zebra", "-l", lib, "--model", model)
    assert code == 2 and "cannot mask ['zebra']" in err
    code, _, err = run(capsys, "route", "x", "--router", "arrow", "--mask", "colors", "-l", lib, "--model", model)
    assert code == 2 and "--mask is a MoLE option" in err


def test_arrow_behind_the_stored_out_of_library_test(capsys, trained_lib, tiny_model_dir):
    lib, model = str(trained_lib.path), str(tiny_model_dir)
    code, out, err = run(capsys, "route", "hello world zebra quantum", "--router", "arrow", "-l", lib, "--model", model,
                         "--json")
    assert code == 0, err
    routing = json.loads(out)  # the library's DLP router has a test: on by default in front of Arrow
    assert routing["router"] == "arrow" and routing["abstained"] and "in front of arrow" in routing["reason"]
    code, out, err = run(capsys, "route", "hello world zebra quantum", "--router", "arrow", "-l", lib, "--model", model,
                         "--no-abstain", "--json")
    assert code == 0, err
    assert json.loads(out)["granularity"] == "token"
    code, out, err = run(capsys, "generate", "hello world zebra quantum", "--router", "arrow", "-l", lib, "--model",
                         model, "--max-new-tokens", "3")
    assert code == 0, err
    assert err.startswith("[arrow] abstained: no adapter fits: energy") and err.rstrip().endswith("-> base model")
    code, out, err = run(capsys, "generate", "hello world zebra quantum", "--router", "arrow", "-l", lib, "--model",
                         model, "--max-new-tokens", "3", "--no-abstain")
    assert code == 0, err
    assert err.startswith("[arrow] per token over 3 adapters")
