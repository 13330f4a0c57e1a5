import json

import pytest
import torch

from loramux.errors import LoramuxError
from loramux.fusion import FusedModel
from loramux.library import Library
from loramux.library.export import export_mixture, merge_mixture, serve_commands
from loramux.models import load_base
from loramux.routers import Routing

from ..cli.test_cli import run
from .conftest import make_peft_dir

MIX = {"a": 0.6, "b": -0.25, "c": 0.4}


@pytest.fixture
def lib(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    # different ranks and target modules; c uses rsLoRA
    lib.add("a", make_peft_dir(tiny_base, tmp_path / "a", targets=("q_proj", "v_proj"), r=4, seed=1), base=tiny_base)
    lib.add("b", make_peft_dir(tiny_base, tmp_path / "b", targets=("o_proj", "down_proj"), r=2, seed=2), base=tiny_base)
    c = make_peft_dir(tiny_base, tmp_path / "c", targets=("q_proj", "up_proj"), r=8, seed=3)
    cfg = json.loads((c / "adapter_config.json").read_text())
    (c / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    lib.add("c", c, base=tiny_base)
    return lib


def fused_logits(model_dir, lib, ids):
    fused = FusedModel(load_base(str(model_dir)))
    for n in MIX:
        fused.load(lib, n)
    with torch.no_grad(), fused.mixture(fused.sequence_mixture([MIX])):
        return fused.base.model(input_ids=ids).logits


def test_exported_lora_loads_in_peft_with_the_fused_logits(tiny_model_dir, lib, tmp_path):
    from peft import PeftModel

    base = load_base(str(tiny_model_dir))
    ids = torch.tensor([base.tokenizer("The quick brown fox jumps")["input_ids"]])
    dest = export_mixture(lib, MIX, tmp_path / "out", base)
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 + 2 + 8 and not config["use_rslora"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft = PeftModel.from_pretrained(load_base(str(tiny_model_dir)).model, dest).eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    assert float((theirs - fused_logits(tiny_model_dir, lib, ids)).abs().max()) <= 1e-4


def test_merged_model_loads_in_transformers_with_the_fused_logits(tiny_model_dir, lib, tmp_path):
    from transformers import AutoModelForCausalLM

    base = load_base(str(tiny_model_dir))
    ids = torch.tensor([base.tokenizer("one two three four")["input_ids"]])
    dest = merge_mixture(lib, MIX, tmp_path / "merged", base)
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        theirs = merged(input_ids=ids).logits
    assert float((theirs - fused_logits(tiny_model_dir, lib, ids)).abs().max()) <= 1e-4


def test_what_cannot_be_exported(lib, tiny_base, tmp_path):
    with pytest.raises(LoramuxError, match="cannot export a arrow routing: its weights change per token"):
        export_mixture(lib, Routing(("a",), (1.0,), router="arrow", granularity="token"), tmp_path / "x", tiny_base)
    with pytest.raises(LoramuxError, match="nothing to export"):
        export_mixture(lib, {}, tmp_path / "x", tiny_base)
    export_mixture(lib, {"a": 1.0}, tmp_path / "once", tiny_base)
    with pytest.raises(LoramuxError, match="already exists"):
        export_mixture(lib, {"a": 1.0}, tmp_path / "once", tiny_base)


def test_serve_commands_round_the_rank_for_vllm(tmp_path):
    cmds = serve_commands("/models/base", tmp_path / "mix", 14)
    assert "--max-lora-rank 16" in cmds["vllm"] and "--max-lora-rank 14" in cmds["sglang"]
    with pytest.raises(LoramuxError, match="exceeds vLLM's largest"):
        serve_commands("/m", tmp_path, 600)


def test_cli_export(capsys, lib, tiny_model_dir, tmp_path):
    code, out, err = run(capsys, "export", str(tmp_path / "e"), "--mix", "a=0.5,c=0.5", "-l", str(lib.path),
                         "--model", str(tiny_model_dir))
    assert code == 0, err
    assert "PEFT LoRA of rank 12" in out and "vllm serve" in out and "--max-lora-rank 16" in out
    code, _, err = run(capsys, "export", str(tmp_path / "f"), "--router", "arrow", "-l", str(lib.path))
    assert code == 2 and "an exported adapter holds one fixed mixture" in err
