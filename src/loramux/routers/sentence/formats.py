"""Prompt formats for training and testing the DLP router beyond its tasks' own templates.

A router trained on each task's template alone learns the template: every BIG-bench task has its
own prefixes, so a 1.000 accuracy there measures template recognition, and the same content sent
by a real client (no prefix, another instruction, a chat turn) can route anywhere. Training
therefore sees each example in several formats (`TRAIN_FORMATS`), and the routing benchmark
adds one template no training prompt ever had (`HELD_OUT_FORMATS`), so its score is not a
template match either.

Instructions are replaced by generic ones drawn from fixed lists, not paraphrased by a model:
what varies is everything around the content, which is what real clients vary.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable

from ...errors import LoramuxError

if TYPE_CHECKING:
    from ...data import Example

_INSTRUCTIONS = (
    "Answer the following.",
    "Read the text below and give the answer.",
    "Please respond to this:",
    "Here is a question for you.",
    "Solve this task.",
    "Reply with the correct answer.",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _pick(ex: "Example", options: tuple[str, ...]) -> str:
    """A choice that depends on the example alone, so a format renders the same text every time."""
    return options[int.from_bytes(hashlib.sha256(ex.prompt.encode()).digest()[:4], "little") % len(options)]


def _content(ex: "Example") -> str:
    return ex.raw.strip()


def _lettered(ex: "Example") -> str:
    return "".join(f"\n{_LETTERS[i % 26]}) {c}" for i, c in enumerate(ex.choices))


def _chat(ex: "Example") -> str:
    # a client that renders the chat template itself and sends the text to /v1/completions
    return f"<|im_start|>user\n{ex.prompt.strip()}<|im_end|>\n<|im_start|>assistant\n"


Render = Callable[["Example"], str]

TRAIN_FORMATS: dict[str, Render] = {
    "own": lambda ex: ex.prompt,  # the task's own template
    "raw": _content,  # the content alone, as a chat user often types it
    "stripped": lambda ex: ex.prompt.strip(),  # a chat turn: the template's surrounding whitespace trimmed
    "qa": lambda ex: f"Question: {_content(ex)}{_lettered(ex)}\nAnswer:",
    "instruction": lambda ex: f"{_pick(ex, _INSTRUCTIONS)}\n\n{_content(ex)}{_lettered(ex)}",
    "chat": _chat,
}

# Never used in training: the benchmark's "other template".
HELD_OUT_FORMATS: dict[str, Render] = {
    "other_template": lambda ex: "### Input:\n" + _content(ex)
    + ("\n### Options:" + "".join(f"\n{i + 1}. {c}" for i, c in enumerate(ex.choices)) if ex.choices else "")
    + "\n### Response:",
}

FORMATS: dict[str, Render] = {**TRAIN_FORMATS, **HELD_OUT_FORMATS}


def render(ex: "Example", fmt: str) -> str:
    try:
        return FORMATS[fmt](ex)
    except KeyError:
        raise LoramuxError(f"unknown prompt format {fmt!r}; accepted: {sorted(FORMATS)}") from None


def check_formats(formats: tuple[str, ...]) -> None:
    """Training formats must be training ones (a held-out format trained on would no longer be held out)."""
    bad = [f for f in formats if f not in TRAIN_FORMATS]
    if bad or not formats:
        raise LoramuxError(f"router training formats must be a non-empty subset of {list(TRAIN_FORMATS)}; "
                           f"got {list(formats)}")
