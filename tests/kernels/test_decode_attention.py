"""The compiled decode step's attention of one query token per row (kernels/decode_attention.cpp)
against the definition: softmax over each row's visible positions of q·k/√D, then the weighted
sum of the values, computed here in float64."""

import math

import pytest
import torch

from loramux.kernels import build_error, decode_attention_op


@pytest.fixture(scope="module")
def op():
    op = decode_attention_op()
    assert op is not None, f"the kernels did not build here: {build_error()}"
    return op


def reference(q, keys, values, positions):
    """float64: each row s and head h over its key/value head's cache positions 0..positions[s]."""
    S, H, D = q.shape
    G = keys.shape[2]
    out = torch.zeros(S, H, D, dtype=torch.float64)
    for s in range(S):
        n = int(positions[s]) + 1
        for h in range(H):
            g = h // (H // G)
            k, v = keys[:n, s, g].double(), values[:n, s, g].double()
            p = torch.softmax(k @ q[s, h].double() / math.sqrt(D), dim=0)
            out[s, h] = p @ v
    return out.reshape(S, H * D)


@pytest.mark.parametrize("S,H,G,D,L", [(1, 9, 3, 64, 64), (3, 4, 4, 12, 70), (4, 6, 2, 8, 5), (16, 9, 3, 64, 128)])
def test_the_kernel_equals_the_definition(op, S, H, G, D, L):
    """Grouped (9 query heads over 3) and plain multi-head attention, head sizes that are and are not
    multiples of its 8-wide sums, rows at the first and the last position of the view, and enough
    rows to be shared out among threads."""
    torch.manual_seed(0)
    q, keys, values = torch.randn(S, H, D), torch.randn(L, S, G, D), torch.randn(L, S, G, D)
    positions = torch.randint(0, L, (S,))
    positions[0] = 0
    positions[-1] = L - 1
    got = op(q, keys, values, positions)
    assert got.shape == (S, H * D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(q, keys, values, positions), atol=1e-5, rtol=1e-5)


def test_a_row_reads_nothing_past_its_own_position_and_does_not_depend_on_its_batch(op):
    """Positions past a row's own (here NaN) never reach it, and a row's output is the same bit for
    bit alone and beside other rows."""
    torch.manual_seed(1)
    S, H, G, D, L = 4, 6, 3, 16, 40
    q, keys, values = torch.randn(S, H, D), torch.randn(L, S, G, D), torch.randn(L, S, G, D)
    positions = torch.tensor([5, 0, 39, 17])
    for s in range(S):
        keys[positions[s] + 1:, s] = float("nan")
        values[positions[s] + 1:, s] = float("nan")
    got = op(q, keys, values, positions)
    assert torch.isfinite(got).all()
    for s in range(S):
        alone = op(q[s:s + 1], keys[:, s:s + 1], values[:, s:s + 1], positions[s:s + 1])
        assert torch.equal(alone[0], got[s])


def test_bad_inputs_are_refused(op):
    q, kv = torch.randn(1, 6, 8), torch.randn(4, 1, 4, 8)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(q, kv, kv, torch.zeros(1, dtype=torch.long))  # 6 query heads over 4 key/value heads
    with pytest.raises(RuntimeError, match="fp32"):
        op(q.double(), kv.double(), kv.double(), torch.zeros(1, dtype=torch.long))
    kv = torch.randn(4, 1, 2, 8)
    with pytest.raises(RuntimeError, match="negative position"):
        op(q, kv, kv, torch.tensor([-1]))


def test_a_position_past_the_view_sees_all_of_it(op):
    """As the step's mask (index <= position) does, and an empty batch gives an empty output."""
    torch.manual_seed(2)
    q, keys, values = torch.randn(2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    got = op(q, keys, values, torch.tensor([9, 5]))
    torch.testing.assert_close(got.double(), reference(q, keys, values, torch.tensor([5, 5])), atol=1e-5, rtol=1e-5)
    assert op(q[:0], keys[:, :0], values[:, :0], torch.zeros(0, dtype=torch.long)).shape == (0, 32)
