"""The CLI is thin: these tests drive it in-process as a user would and check what it prints."""

import json

import pytest

from loramux.cli import main
from loramux.library import Library

from ..conftest import toy_mc_task, write_task_json
from ..library.conftest import make_peft_dir


def run(capsys, *argv):
    """Run `loramux argv...`; return (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", [[], ["model"], ["data"], ["library"], ["train"], ["score"], ["generate"],
                                 ["demo"], ["library", "add"], ["data", "fetch"]])
def test_help_everywhere(capsys, cmd):
    code, out, _ = run(capsys, *cmd, "--help")
    assert code == 0 and "Usage" in out


def test_bad_input_is_one_line_and_exit_2(capsys):
    code, out, err = run(capsys, "model", "info", "--model", "no-such-model")
    assert code == 2 and "loramux: error: unknown model 'no-such-model'" in err and "Traceback" not in err


def test_model_info(capsys, tiny_model_dir, tiny_base):
    code, out, _ = run(capsys, "model", "info", "--model", str(tiny_model_dir))
    assert code == 0 and f"fingerprint:  {tiny_base.fingerprint}" in out and "q_proj" in out


def test_library_commands(capsys, tmp_path, tiny_base, tiny_model_dir):
    src = make_peft_dir(tiny_base, tmp_path / "src")
    lib = str(tmp_path / "lib")
    assert run(capsys, "library", "init", lib)[0] == 0
    code, out, _ = run(capsys, "library", "add", str(src), "--name", "alpha", "--tasks", "t1",
                       "--model", str(tiny_model_dir), "-l", lib)
    assert code == 0 and "added alpha v1 (r=4" in out
    code, out, _ = run(capsys, "library", "list", "-l", lib)
    assert "alpha" in out and "tasks=t1" in out and "r=4" in out
    code, out, _ = run(capsys, "library", "show", "alpha", "-l", lib)
    assert json.loads(out)["target_modules"] == ["q_proj", "v_proj"]
    code, out, _ = run(capsys, "library", "verify", "--model", str(tiny_model_dir), "-l", lib)
    assert code == 0 and "1 adapter(s), 0 problem(s)" in out
    code, _, err = run(capsys, "library", "add", str(src), "--name", "alpha", "--model", str(tiny_model_dir), "-l", lib)
    assert code == 2 and "already in library" in err
    assert run(capsys, "library", "export", "alpha", str(tmp_path / "out"), "-l", lib)[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert run(capsys, "library", "remove", "alpha", "-l", lib)[0] == 0
    assert Library(lib).names() == []
    code, _, err = run(capsys, "library", "list", "-l", str(tmp_path / "src"))
    assert code == 2 and "is not a loramux library" in err


def test_library_general(capsys, tmp_path, tiny_base):
    lib = Library(tmp_path / "lib", create=True)
    lib.add("alpha", make_peft_dir(tiny_base, tmp_path / "src"), base=tiny_base, tasks=["t1"])
    lib.add("all", make_peft_dir(tiny_base, tmp_path / "src2", seed=1, r=8), base=tiny_base)
    where = ("-l", str(lib.path))
    assert "none: abstained prompts go to the base model" in run(capsys, "library", "general", *where)[1]
    code, out, err = run(capsys, "library", "general", "all", *where)
    assert code == 0 and "general adapter: all" in out and lib.general == "all"
    assert "'all' has rank 8, the routed adapters at most 4" in err  # what it costs the routed forwards
    assert run(capsys, "library", "general", *where)[1].strip() == "all"
    assert "all" in run(capsys, "library", "list", *where)[1].split("[general")[0].splitlines()[-1]
    code, _, err = run(capsys, "library", "general", "nope", *where)
    assert code == 2 and "no adapter named 'nope'" in err and lib.general == "all"
    code, _, err = run(capsys, "library", "general", "all", "--unset", *where)
    assert code == 2 and "not both" in err
    assert run(capsys, "library", "general", "--unset", *where)[0] == 0 and lib.general is None
    # a stored router that routes to the adapter about to be named general: the command says it is refused now
    lib.save_router("dlp", "dlp", ["all", "alpha"], lambda d: (d / "x.json").write_text("{}"))
    code, out, err = run(capsys, "library", "general", "all", *where)
    assert code == 0 and "warning: stored router 'dlp' is refused now (dlp); retrain it" in err
    code, out, err = run(capsys, "library", "general", "all", *where)  # already refused: nothing new to say
    assert code == 0 and "is refused now" not in err


def test_verify_exits_1_on_problems(capsys, tmp_path, tiny_base):
    lib = Library(tmp_path / "lib", create=True)
    lib.add("alpha", make_peft_dir(tiny_base, tmp_path / "src"), base=tiny_base)
    (lib.adapter_dir("alpha") / "adapter_model.safetensors").write_bytes(b"garbage")
    code, out, err = run(capsys, "library", "verify", "-l", str(lib.path))
    assert code == 1 and "1 problem(s)" in out and "sha256" in err


def test_train_score_generate(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    toy_mc_task(data / "toy" / "train.json")
    toy_mc_task(data / "toy" / "test.json", n=6)
    lib = str(tmp_path / "lib")
    code, out, err = run(capsys, "train", "--task", "toy", "--data-dir", str(data), "-l", lib, "--model", str(tiny_model_dir),
                         "--steps", "30", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "2")
    assert code == 0, err
    assert Library(lib).get("toy").training.steps == 30
    code, out, _ = run(capsys, "score", "--task", str(data / "toy"), "--adapter", "toy", "-l", lib,
                       "--model", str(tiny_model_dir), "-o", str(tmp_path / "s.json"))
    assert code == 0 and "multiple_choice_grade  1.0000" in out and "adapter toy" in out
    assert json.loads((tmp_path / "s.json").read_text())[0]["score"] == 1.0
    code, out, _ = run(capsys, "generate", "the word is one", "--adapter", "toy", "-l", lib,
                       "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"
    code, out, _ = run(capsys, "generate", "the word is one", "--mix", "toy=1.0", "-l", lib, "--no-stream",
                       "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"
    code, out, _ = run(capsys, "generate", "the word is one", "--adapter", "toy", "-l", lib, "--compile",
                       "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"  # the compiled decode step (engine/compiled.py)
    code, out, _ = run(capsys, "generate", "the word is one", "--adapter", "toy", "-l", lib, "--quantize", "int8",
                       "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"  # an int8 base under the fp32 adapter (quantize.py)
    code, out, _ = run(capsys, "generate", "the word is one", "--adapter", "toy", "-l", lib, "--quantize", "int8",
                       "--compile", "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"  # the int8 kernel inside the Inductor-compiled step
    code, out, _ = run(capsys, "generate", "the word is one", "--adapter", "toy", "-l", lib, "--quantize", "w8a8",
                       "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    assert code == 0 and out.strip() == "yes"  # int8 weights and rows, integer products (quantize.py)
    code, _, err = run(capsys, "generate", "hi", "--quantize", "int4", "--model", str(tiny_model_dir))
    assert code == 2 and "--quantize" in err and "'none'" in err and "'int8'" in err and "'w8a8'" in err
    code, _, err = run(capsys, "generate", "hi", "--mix", "toy=abc", "-l", lib, "--model", str(tiny_model_dir))
    assert code == 2 and "--mix entry 'toy=abc' is not name=weight" in err
    code, _, err = run(capsys, "generate", "hi", "--mix", "nope=1", "-l", lib, "--model", str(tiny_model_dir))
    assert code == 2 and "no adapter named 'nope'" in err
    code, _, err = run(capsys, "train", "--task", "toy", "--data-dir", str(data), "--name", "x", "--tasks", "toy",
                       "-l", lib, "--model", str(tiny_model_dir))
    assert code == 2 and "either --task or --tasks" in err
    code, _, err = run(capsys, "train", "--task", "nope", "--data-dir", str(data), "-l", lib, "--model", str(tiny_model_dir))
    assert code == 2 and "neither a task path nor a task in data dir" in err
    code, _, err = run(capsys, "train", "--task", "toy", "--data-dir", str(data), "--steps", "0", "-l", lib,
                       "--model", str(tiny_model_dir))
    assert code == 2 and "--steps must be a positive integer" in err


def test_data_show(capsys, tmp_path):
    write_task_json(tmp_path / "t" / "train.json", [{"input": "2+2=", "target": "4"}], example_input_prefix="",
                    example_output_prefix="")
    code, out, _ = run(capsys, "data", "show", str(tmp_path / "t"))
    assert code == 0 and "generative, 1 examples" in out and "2+2=" in out and "['4']" in out


def test_demo_builds_the_library_and_router_then_routes_prompts_through_the_server(capsys, tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    import threading

    import loramux.engine

    built_on = []  # the engine is built on a thread that ends (cpu_threads.py), not on the main thread
    real = loramux.engine.Engine
    monkeypatch.setattr(loramux.engine, "Engine",
                        lambda *a, **k: built_on.append(threading.current_thread()) or real(*a, **k))
    data = tmp_path / "data"
    for split, n in (("train", 24), ("test", 4)):
        toy_mc_task(data / "words" / f"{split}.json", n=n)
        write_task_json(data / "colours" / f"{split}.json",
                        [{"input": f"Which colour do you get by mixing {a} and {b} paint?", "target": "brown"}
                         for a, b in [("red", "green"), ("blue", "orange"), ("yellow", "purple")] * (n // 3 + 1)][:n],
                        example_input_prefix="Q: ", example_output_prefix="\nA: ")
    lib = str(tmp_path / "lib")
    args = ["demo", "--tasks", "words,colours", "--data-dir", str(data), "-l", lib, "--model", str(tiny_model_dir),
            "--steps", "3", "--show", "2", "--output", str(tmp_path / "demo.json")]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert Library(lib).names() == ["colours", "words"] and "dlp" in Library(lib).routers()
    assert "serving on http://127.0.0.1:" in out and "routed to their own task's adapter first 4/4" in out
    records = json.loads((tmp_path / "demo.json").read_text())["prompts"]
    assert [r["task"] for r in records] == ["words", "words", "colours", "colours"]
    assert all(r["routing"]["router"] == "dlp" and r["routing"]["adapters"][0] == r["task"] for r in records)
    assert built_on and all(t is not threading.main_thread() and not t.is_alive() for t in built_on)
    code, out, err = run(capsys, *args)  # the second run trains nothing
    assert code == 0 and "reusing the stored DLP router" in out and "train " not in out
