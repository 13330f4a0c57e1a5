"""Keys and values of recent prompts, reused by prompts that start the same way.

Requests to one server mostly start alike: the chat template's system preamble, a shared
instruction or few-shot block, the earlier turns of a conversation. A token's keys and values
depend only on the tokens before it and on the weights that computed them (the base and the row's
mixture), so a prompt that starts like one prefilled before needs only the tokens after the shared
start computed. llama.cpp's server keeps each slot's last prompt for this; vLLM hashes fixed-size
blocks of the paged cache ("automatic prefix caching"). Here, without a paged cache: the prompts
prefilled last, each whole, per mixture, bounded in tokens, least recently used out first; a lookup
takes the longest common prefix with any of them.

What a key means: a hit reuses tensors computed in another batch, so a row's floating-point values
can differ from its own prefill in the last bits (as they do between batch sizes); the mixture key
names the fused model's adapter version, so a reloaded adapter never serves keys of its old weights
(entries of an old version are never hit again and leave as the least recently used). Not
thread-safe: the scheduler's thread is its only user. Models whose caches keep only a window
(sliding-window attention) store nothing here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer (n_kv, len(ids), head_dim)
    values: list[torch.Tensor]


def common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, max_tokens: int = 4096, min_tokens: int = 8):
        """`max_tokens`: prompt tokens held in all (each costs layers x 2 x kv heads x head dim
        values: 46 KB for SmolLM2-135M in fp32); `min_tokens`: shorter matches are not reused."""
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()  # (mixture key, ids) -> entry
        self.tokens = 0
        self.stats = {"lookups": 0, "hits": 0, "tokens_reused": 0, "tokens_looked_up": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: tuple, ids: list[int]) -> tuple[int, PrefixEntry | None]:
        """The longest cached start of `ids` under mixture `key`: (its length, the entry holding
        it), or (0, None). The prompt's last token is never covered: its logits pick the first
        generated token."""
        self.stats["lookups"] += 1
        self.stats["tokens_looked_up"] += len(ids)
        best, n = None, 0
        for (k, _), entry in self._entries.items():
            if k == key:
                m = common_prefix(entry.ids, ids, len(ids) - 1)
                if m > n:
                    best, n = entry, m
        if best is None or n < self.min_tokens:
            return 0, None
        self._entries.move_to_end((key, best.ids))
        self.stats["hits"] += 1
        self.stats["tokens_reused"] += n
        return n, best

    def wants(self, key: tuple, ids: list[int] | tuple[int, ...]) -> bool:
        """Whether `store` would take this prompt: within the length bounds and not held already
        (a prompt held already counts as just used). Callers check before copying its tensors."""
        ids = tuple(ids)
        if len(ids) < self.min_tokens or len(ids) > self.max_tokens:
            return False
        if (key, ids) in self._entries:
            self._entries.move_to_end((key, ids))
            return False
        return True

    def store(self, key: tuple, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Hold a prompt's keys and values (tensors of its own, not views of a running cache).
        Entries that are a start of this prompt go: this one covers them."""
        ids = tuple(ids)
        if not self.wants(key, ids):
            return
        for k, entry in list(self._entries.items()):
            if k[0] == key and len(entry.ids) <= len(ids) and ids[: len(entry.ids)] == entry.ids:
                self._drop(k)
        self._entries[(key, ids)] = PrefixEntry(ids, keys, values)
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def _drop(self, k: tuple) -> None:
        self.tokens -= len(self._entries.pop(k).ids)
