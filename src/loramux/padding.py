"""Grouping sequences by length so that padded batches waste little compute.

On this CPU a forward is compute-bound from a few dozen tokens on, so every padding position
costs as much as a real one: one left-padded prefill of 16 serving-benchmark prompts (39-301
tokens) ran 4,816 positions in 19.6 s, the same prompts in two length groups 1,561 in 5.9 s; the
router's encoder spent 65 ms per prompt on a batch of 32 mixed prompts and 35 ms in batches of 8.
"""

from __future__ import annotations


def length_groups(lengths: list[int], *, waste: float = 0.25, slack: int = 128,
                  max_size: int | None = None) -> list[list[int]]:
    """Indices of the sequences grouped for padded batches, shortest first.

    A group grows while its padded size (members x the longest) stays within `waste` of its real
    tokens plus `slack` positions (short sequences share a forward: the per-forward overhead is
    worth more than their padding), and while it has fewer than `max_size` members.
    """
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]
        last = groups[-1] if groups else None
        if (last is not None and (max_size is None or len(last) < max_size)
                and (len(last) + 1) * n <= (1 + waste) * (total + n) + slack):
            last.append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups
