"""The model families people fine-tune LoRAs for: tiny random Llama, Qwen2, Mistral, Gemma 2 and
Phi-3 (whose attention and MLP projections are fused: `qkv_proj`, `gate_up_proj`). On each: a LoRA
trains on every projection by default, goes into the library and exports as a mixture PEFT loads;
fused single adapters and mixtures equal PEFT; a mixed batch equals each row alone; the engine
finds each family's projections by itself and generates batch-invariantly."""

import pytest
import torch

from loramux.fusion import FusedModel
from loramux.library.checks import read_peft_dir
from loramux.models import load_base

from ..conftest import build_tokenizer
from ..library.conftest import make_peft_dir

TOL = 1e-4
IDS = torch.tensor([[5, 9, 17, 33, 2, 40, 7], [11, 3, 8, 19, 23, 29, 31]])
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=True, pad_token_id=None)
LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj")),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None},
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8},
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    import transformers

    config_cls, model_cls, extra, targets = FAMILIES[request.param]
    tok = build_tokenizer()
    config = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, **{**COMMON, **extra})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    tok.save_pretrained(path)
    base = load_base(str(path))
    adapters = {"x": make_peft_dir(base, path / "x", targets=targets[:2], r=4, seed=1),
                "y": make_peft_dir(base, path / "y", targets=targets[-2:], r=2, seed=2)}
    return path, targets, adapters


def fused_logits(path, targets, adapters, rows):
    fused = FusedModel(load_base(str(path)), targets)
    for name, d in adapters.items():
        fused.add_adapter(name, read_peft_dir(d))
    with torch.no_grad(), fused.mixture(fused.sequence_mixture(rows)):
        return fused.base.model(input_ids=IDS.to(fused.base.model.device)).logits


def test_fused_single_and_mixed_equal_peft(family, where):
    from peft import PeftModel

    path, targets, adapters = family
    peft = PeftModel.from_pretrained(load_base(str(path)).model, adapters["x"], adapter_name="x")
    peft.load_adapter(adapters["y"], adapter_name="y")
    peft.eval()
    for name in adapters:
        peft.set_adapter(name)
        with torch.no_grad():
            want = peft(input_ids=IDS.to(peft.device)).logits
        assert (fused_logits(path, targets, adapters, [{name: 1.0}] * 2) - want).abs().max() <= where.tol(TOL), name
    peft.add_weighted_adapter(["x", "y"], [0.7, 0.3], "mix", combination_type="cat")
    peft.set_adapter("mix")
    with torch.no_grad():
        want = peft(input_ids=IDS.to(peft.device)).logits
    assert (fused_logits(path, targets, adapters, [{"x": 0.7, "y": 0.3}] * 2) - want).abs().max() <= where.tol(TOL)


def test_a_mixed_batch_equals_each_row_alone(family, where):
    path, targets, adapters = family
    rows = [{"x": 1.0}, {"x": 0.5, "y": -0.5}]
    both = fused_logits(path, targets, adapters, rows)
    for b, row in enumerate(rows):
        alone = fused_logits(path, targets, adapters, [row, row])
        assert (both[b] - alone[b]).abs().max() <= where.tol(TOL)


def test_train_add_and_export_on_each_family(family, where, tmp_path):
    """A LoRA trained with the default targets adapts every projection; the library takes it; an
    exported mixture of it and another adapter loads in PEFT and equals the fused mixture."""
    from peft import PeftModel

    from loramux.data import load_task
    from loramux.library import Library
    from loramux.library.export import export_mixture
    from loramux.training import LoraTrainConfig, train_lora

    from ..conftest import toy_mc_task

    path, targets, adapters = family
    base = load_base(str(path))
    task = load_task(toy_mc_task(tmp_path / "toy" / "train.json"), "train")
    result = train_lora(base, task, LoraTrainConfig(target_modules=("auto",), steps=2, warmup_steps=0, batch_size=4,
                                                    checkpoint_every=0), progress=False)
    lib = Library(tmp_path / "lib", create=True)
    spec = lib.add("trained", result.model, base=base, tasks=["toy"])
    result.model.unload()
    assert set(read_peft_dir(lib.path / "adapters" / spec.dir).config["target_modules"]) == set(targets)
    lib.add("x", adapters["x"], base=base)
    mix = {"trained": 0.6, "x": -0.4}
    exported = export_mixture(lib, mix, tmp_path / "export", base)
    peft = PeftModel.from_pretrained(load_base(str(path)).model, str(exported)).eval()
    fused = FusedModel(load_base(str(path)))
    for name in mix:
        fused.load(lib, name)
    with torch.no_grad():
        want = peft(input_ids=IDS.to(peft.device)).logits
        with fused.mixture(fused.sequence_mixture([mix] * 2)):
            got = fused.base.model(input_ids=IDS.to(peft.device)).logits
    assert (got - want).abs().max() <= where.tol(TOL)


def test_the_engine_finds_each_familys_projections_and_batches_invariantly(family):
    from loramux.engine import Engine, GenerationRequest, SamplingParams

    path, targets, adapters = family
    engine = Engine(load_base(str(path)))  # no target modules given
    assert set(engine.fused.target_modules) == set(targets)
    for name, d in adapters.items():
        engine.fused.add_adapter(name, read_peft_dir(d))
    mixes = [{"x": 1.0}, {"x": 0.5, "y": 0.5}, None, {"y": -1.0}]
    requests = [GenerationRequest(p, m, SamplingParams(max_new_tokens=5, ignore_eos=True), chat=False)
                for p, m in zip(["one two", "The quick brown fox", "x", "three four five six"], mixes)]
    together = [r.token_ids for r in engine.generate(requests)]
    assert together == [engine.generate([r])[0].token_ids for r in requests]
