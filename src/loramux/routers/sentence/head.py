"""The DLP-LoRA classifier head: a small MLP from a sentence embedding to adapter logits.

The paper's "mini-MLP" is about 5M parameters; the default (384 -> 2048 -> 2048 -> K) is
5.0M for K = 14 on MiniLM's 384-dim embeddings. `hidden=()` gives a linear probe.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import LoramuxError


class MlpHead(nn.Module):
    def __init__(self, dim: int, n_out: int, hidden: tuple[int, ...] = (2048, 2048), dropout: float = 0.1):
        super().__init__()
        if n_out < 1:
            raise LoramuxError(f"a router needs at least one adapter; got {n_out}")
        if any(h < 1 for h in hidden):
            raise LoramuxError(f"hidden sizes must be positive integers; got {list(hidden)}")
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)
        self.dim, self.n_out, self.hidden, self.dropout = dim, n_out, tuple(hidden), dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
