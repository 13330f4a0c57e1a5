import pytest

from loramux.errors import LoramuxError
from loramux.evaluation.stats import paired_bootstrap


def test_identical_strategies_differ_by_nothing():
    a = {"t1": [1, 0, 1, 1], "t2": [0, 0, 1]}
    r = paired_bootstrap(a, a)
    assert (r["difference"], r["low"], r["high"]) == (0.0, 0.0, 0.0) and r["p_not_above_zero"] == 1.0


def test_difference_is_the_task_averaged_one_in_points_and_inside_its_interval():
    a = {"t1": [1] * 30 + [0] * 10, "t2": [1, 1, 0, 0]}
    b = {"t1": [1] * 20 + [0] * 20, "t2": [1, 0, 0, 0]}
    r = paired_bootstrap(a, b, resamples=500, seed=3)
    assert r["difference"] == pytest.approx(100 * ((0.75 - 0.5) + (0.5 - 0.25)) / 2)
    assert r["low"] < r["difference"] < r["high"] and r["low"] > 0  # a never below b on any prompt
    assert r == paired_bootstrap(a, b, resamples=500, seed=3)  # seeded


def test_pairing_shrinks_the_interval_of_correlated_scores():
    # b is a plus one extra right answer: paired, the difference can only be >= 0
    a = {"t": [1, 0] * 20}
    b = {"t": [1, 0] * 19 + [1, 1]}
    r = paired_bootstrap(b, a)
    assert r["low"] >= 0 and r["high"] <= 100 * 3 / 40


def test_mismatched_inputs_are_refused():
    with pytest.raises(LoramuxError, match="same, non-empty tasks"):
        paired_bootstrap({"t": [1]}, {"u": [1]})
    with pytest.raises(LoramuxError, match="2 and 1 scores"):
        paired_bootstrap({"t": [1, 0]}, {"t": [1]})
    with pytest.raises(LoramuxError, match="1 and 2 scores"):
        paired_bootstrap({"t": [1]}, {"t": [1, 0]})
