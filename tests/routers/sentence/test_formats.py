"""The prompt formats the DLP router trains and is tested on (formats.py)."""

import pytest

from loramux.data import load_task
from loramux.data.bigbench import parse_bigbench
from loramux.errors import LoramuxError
from loramux.routers.sentence import FORMATS, HELD_OUT_FORMATS, TRAIN_FORMATS, DlpTrainConfig, render


@pytest.fixture
def where():
    """Router training and routing do not depend on the model's dtype: these tests run once, CPU fp32."""
    from ...conftest import Where

    return Where("cpu", "float32")


TASK = {"task_prefix": "Pick the colour.\n", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
        "examples": [{"input": "What colour is the sky?", "target_scores": {"blue": 1, "red": 0}},
                     {"input": "Name a fruit", "target": "apple"}]}


def test_each_format_keeps_the_content_and_changes_the_frame():
    ex = parse_bigbench({**TASK, "examples": TASK["examples"][:1]}, name="t").examples[0]
    assert ex.content == "What colour is the sky?" and ex.prompt.startswith("Pick the colour.\n\nQ: ")
    out = {f: render(ex, f) for f in FORMATS}
    assert out["own"] == ex.prompt
    assert out["raw"] == "What colour is the sky?"
    assert out["stripped"] == ex.prompt.strip()
    assert out["qa"].startswith("Question: What colour is the sky?\nA) ") and out["qa"].endswith("\nAnswer:")
    assert out["chat"].startswith("<|im_start|>user\nPick the colour.") and out["chat"].endswith("assistant\n")
    assert out["other_template"].startswith("### Input:\nWhat colour is the sky?\n### Options:\n1. ")
    assert all("What colour is the sky?" in text for text in out.values())
    assert render(ex, "instruction") == render(ex, "instruction")  # drawn per example, the same every time
    assert len(set(out.values())) == len(out)


def test_a_generative_example_and_a_reader_without_content(tmp_path):
    gen = parse_bigbench({**TASK, "examples": TASK["examples"][1:]}, name="t").examples[0]
    assert render(gen, "other_template") == "### Input:\nName a fruit\n### Response:"
    (tmp_path / "t.jsonl").write_text('{"prompt": "Say hi", "completion": "hi"}\n')
    plain = load_task(tmp_path / "t.jsonl").examples[0]
    assert plain.content == "" and render(plain, "raw") == "Say hi"  # the prompt stands in for the content


def test_content_leaves_example_identity_unchanged():
    """Digests of a task's examples (recipes, caches) are computed from repr and ==."""
    ex = parse_bigbench({**TASK, "examples": TASK["examples"][:1]}, name="t").examples[0]
    assert "content" not in repr(ex)
    assert ex == type(ex)(ex.prompt, ex.targets, ex.choices, ex.choice_scores)


def test_training_takes_training_formats_only():
    assert not set(HELD_OUT_FORMATS) & set(TRAIN_FORMATS)
    with pytest.raises(LoramuxError, match="subset of"):
        DlpTrainConfig(formats=("own", "other_template"))
    with pytest.raises(LoramuxError, match="subset of"):
        DlpTrainConfig(formats=())
    with pytest.raises(LoramuxError, match="unknown prompt format 'xml'"):
        render(parse_bigbench({**TASK, "examples": TASK["examples"][1:]}, name="t").examples[0], "xml")
