from pathlib import Path

import pytest

from ...conftest import write_task_json

WORDS = {  # three tasks whose prompts share no word: a router must separate them exactly
    "animals": ["cat", "dog", "horse", "cow", "sheep", "goat", "duck", "mouse"],
    "colors": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven", "eight"],
}


def task_prompts(task: str, n: int, offset: int = 0) -> list[str]:
    w = WORDS[task]
    return [f"{w[(i + offset) % 8]} {w[(3 * i + 1 + offset) % 8]} {w[(5 * i + 2) % 8]}" for i in range(n)]


def build_bert_dir(path: Path) -> Path:
    """A tiny random BERT encoder with a word-level vocabulary, saved as an HF dir."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]"] + sorted({w for ws in WORDS.values() for w in ws})
    vocab += ["hello", "world", "zebra", "quantum"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return build_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    for task in WORDS:
        for split, n, off in (("train", 40, 0), ("test", 10, 1)):
            examples = [{"input": p, "target": "x"} for p in task_prompts(task, n, off)]
            write_task_json(d / task / f"{split}.json", examples, example_input_prefix="", example_output_prefix=" ")
    return d


@pytest.fixture
def task_lib(tiny_base, tmp_path):
    from loramux.library import Library

    from ...library.conftest import make_peft_dir

    lib = Library(tmp_path / "lib", create=True)
    for i, task in enumerate(WORDS):
        lib.add(task, make_peft_dir(tiny_base, tmp_path / f"peft-{task}", seed=i), base=tiny_base, tasks=[task])
    return lib
