import pytest

from loramux.errors import LoramuxError
from loramux.routers import Routing, fusion_weights, top_p_select


@pytest.mark.parametrize("probs, p, expected", [
    ([0.7, 0.2, 0.1], 0.6, [0]),  # the first already reaches p
    ([0.5, 0.3, 0.2], 0.6, [0, 1]),  # smallest prefix reaching p
    ([0.2, 0.5, 0.3], 0.6, [1, 2]),  # sorted by probability, not by position
    ([0.6, 0.4], 0.6, [0]),  # reaching p exactly is enough
    ([0.1, 0.1, 0.8], 0.05, [2]),  # always at least one
    ([0.4, 0.4, 0.2], 0.5, [0, 1]),  # a tie: the lower index comes first
    ([0.2, 0.4, 0.4], 0.3, [1]),
    ([0.5, 0.25, 0.25, 0.0], 1.0, [0, 1, 2]),  # p = 1 keeps every adapter with nonzero probability
    ([0.1] * 10, 1.0, list(range(10))),  # float sums below 1.0 still reach p = 1
])
def test_top_p_selection(probs, p, expected):
    assert top_p_select(probs, p) == expected


def test_top_k_caps_the_prefix():
    assert top_p_select([0.3, 0.3, 0.2, 0.2], 0.9, top_k=2) == [0, 1]
    assert top_p_select([0.3, 0.3, 0.2, 0.2], 0.9, top_k=1) == [0]


@pytest.mark.parametrize("p, k", [(0.0, None), (1.5, None), (-0.1, None), (0.5, 0)])
def test_bad_selection_settings(p, k):
    with pytest.raises(LoramuxError, match="top-p|top-k"):
        top_p_select([0.5, 0.5], p, k)


def test_fusion_weights():
    assert fusion_weights([0.5, 0.3]) == pytest.approx([0.625, 0.375])
    soft = fusion_weights([0.5, 0.3], "softmax")  # the public code's flatter weights
    assert soft[0] == pytest.approx(1 / (1 + 2.718281828 ** -0.2)) and sum(soft) == pytest.approx(1)
    with pytest.raises(LoramuxError, match="weighting"):
        fusion_weights([1.0], "mean")


def test_routing_mixture():
    r = Routing(("a", "b"), (0.75, 0.25), {"a": 0.6, "b": 0.2, "c": 0.2})
    assert r.mixture == {"a": 0.75, "b": 0.25}
    assert r.ranked()[0] == ("a", 0.6)
    assert Routing((), (), {"a": 1.0}, abstained=True).mixture is None
