"""Turning examples into token tensors: one place, shared by training and scoring."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..data import Example, PromptFormatter

IGNORE = -100  # label value the loss skips (prompt tokens, padding)


def encode_for_training(formatter: "PromptFormatter", example: "Example", max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): loss only on the answer tokens (+ end-of-turn).

    When too long, the prompt loses its *start* (the task prefix), never the answer.
    """
    prompt = formatter.encode_prompt(example.prompt)
    answer = formatter.encode_answer(example.answer)[:max_len - 1]  # >= 1 prompt token predicts the first
    prompt = prompt[max(0, len(prompt) + len(answer) - max_len):]
    return prompt + answer, [IGNORE] * len(prompt) + answer


class LazyFeatures:
    """`encode_for_training` of each example, done when a batch first needs it: S steps of B
    examples touch at most S·B of them, and a fetched BIG-bench task holds up to 40 000 (encoding
    all of hyperbaton's took ~20 s before a 30-step run of ~2 min)."""

    def __init__(self, formatter: "PromptFormatter", examples: "list[Example]", max_len: int):
        self.formatter, self.examples, self.max_len = formatter, examples, max_len
        self._done: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._done:
            self._done[i] = encode_for_training(self.formatter, self.examples[i], self.max_len)
        return self._done[i]


def pad_right(rows: list[list[int]], pad: int) -> "torch.Tensor":
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(input_ids, attention_mask), each row padded on the left so all end at the last position."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def collate(features: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded batch in Hugging Face's usual form (the model computes the loss itself)."""
    ids = [f[0] for f in features]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(r) for r in ids], 0),
        "labels": pad_right([f[1] for f in features], IGNORE),
    }


def collate_left(features: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[dict[str, "torch.Tensor"], "torch.Tensor"]:
    """Left-padded batch whose answers all end at the last position, plus their labels.

    Returns (model inputs, labels of shape (B, K)) where K-1 is the longest answer: the model
    then needs logits only for the last K positions (`logits_to_keep=K`), which skips the
    vocabulary projection for every prompt token (a fifth of SmolLM2's forward FLOPs).
    Explicit position_ids keep each row's positions as if it were unpadded.
    """
    import torch

    width = max(len(f[0]) for f in features)
    answer = max(sum(1 for t in f[1] if t != IGNORE) for f in features)
    ids, mask = left_pad([f[0] for f in features], pad_id)
    labels = torch.tensor([[IGNORE] * (width - len(f[1])) + f[1] for f in features], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return inputs, labels[:, width - answer:]


def answer_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """Mean next-token cross-entropy over answer tokens.

    logits: (B, K, V) for the last K positions; labels: (B, K-1) tokens those positions predict.
    """
    import torch

    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE
    )


def micro_batch_indices(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """Example indices of micro-batch `index` in an endless stream of seeded epoch shuffles.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    out = []
    pos = index * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset: offset + batch_size - len(out)]
        out.extend(take)
        pos += len(take)
    return out
