"""Shared fixtures: a tiny random Llama and a tokenizer, both built in code (no downloads)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Question: which one? Answer: yes no maybe",
    "Predict the intent of the utterance. play music book restaurant get weather",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def build_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    return fast


def build_model_dir(path: Path, *, seed: int = 0, chat: bool = True, layers: int = 2, init_range: float = 0.3) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(chat)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        # No pad_token_id: HF would zero that embedding row, and pad is also EOS (as in SmolLM2).
        pad_token_id=None,
        # Larger than HF's 0.02: with tiny tied embeddings the logits could barely move from
        # uniform, and no adapter could fit anything.
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@dataclass(frozen=True)
class Where:
    """A (device, dtype) the engine, fusion, router and server suites run on, and how close two
    results must be there. fp32: the fused layer against PEFT and a row alone against its batch
    agree to float rounding, the test's own bound. bf16: the factors stay fp32 and the update is
    added before one rounding (as PEFT does): one adapter alone matched PEFT exactly, but any other
    order of the same fp32 sums (a mixture, a batch of different rows, a cached decode step) can
    round a hidden value one bf16 step (2**-8 relative) the other way, and two layers amplify that
    to up to ~0.13 at the tiny model's logits (|logit| < 8, measured), so bf16 bounds are 0.25. A
    wrong weight of 0.1 on one adapter moves those logits by ~0.7: still caught."""

    device: str
    dtype: str

    def tol(self, fp32: float) -> float:
        """The bound for a comparison whose fp32 bound is `fp32`."""
        return fp32 if self.dtype == "float32" else 0.25

    def __str__(self) -> str:
        return f"{self.device}-{self.dtype}"


WHERE = [Where("cpu", "float32"), Where("cpu", "bfloat16"), Where("cuda", "float32"), Where("cuda", "bfloat16")]


@pytest.fixture(params=WHERE, ids=str)
def where(request, monkeypatch) -> Where:
    """Runs a test once per (device, dtype): CPU fp32 and bf16 always, CUDA where present. Every
    model the test loads with `load_base` defaults (`tiny_base`, the engines, the CLI) is loaded there."""
    import torch

    from loramux.models import load_base

    w: Where = request.param
    if w.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (torch.cuda.is_available() is False)")
    monkeypatch.setattr(load_base, "__kwdefaults__", {**load_base.__kwdefaults__, "device": w.device, "dtype": w.dtype})
    return w


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture as tiny_model_dir, different weights: a different base model."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture
def tiny_base(tiny_model_dir):
    from loramux.models import load_base

    return load_base(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own $LORAMUX_HOME unless it is a slow test using the real model cache."""
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("LORAMUX_SHARED_DATA", REPO.parent / "shared" / "data" / "bigbench"))
    if not path.is_dir():
        pytest.skip(f"shared BIG-bench data not found at {path} (set LORAMUX_SHARED_DATA)")
    return path


def write_task_json(path: Path, examples: list[dict], **meta) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": path.parent.name, **meta, "examples": examples}))
    return path


def toy_mc_task(path: Path, n: int = 24) -> Path:
    """A multiple-choice task whose answer is a fixed function of the input (learnable fast)."""
    words = ["one", "two", "three", "four", "five", "six"]
    examples = []
    for i in range(n):
        w = words[i % len(words)]
        examples.append({"input": f"the word is {w}", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}})
    return write_task_json(path, examples, append_choices_to_input=False, example_input_prefix="",
                           example_output_prefix="\nAnswer: ")
