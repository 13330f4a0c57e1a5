import pytest

from loramux.evaluation.plots import cost_points, plot_results


def _result(strategies, routing=None):
    r = {"strategies": {s: {"per_task": {"a": 0.5, "b": 0.25}, "average": 0.375, **extra}
                        for s, extra in strategies.items()}}
    if routing:
        r["routing"] = routing
    return r


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_plot_when_the_result_has_what_it_needs(tmp_path):
    costed = {"cost_ratio": 1.2}
    routing = {s: {"labels": ["x", "y"], "confusion": [[3, 1], [0, 4]], "top1_accuracy": 0.875}
               for s in ("dlp_p0.3", "dlp_p0.6")}
    files = plot_results(_result({"base": costed, "oracle": costed, "dlp_p0.3": costed, "dlp_p0.6": costed}, routing),
                         tmp_path, prefix="c")
    assert files == ["c_heatmap.png", "c_router_confusion.png", "c_top_p.png", "c_cost.png"]
    assert all(_is_png(tmp_path / f) for f in files)


@pytest.mark.parametrize("strategies, expected", [
    ({"base": {}, "oracle": {}}, ["eval_heatmap.png"]),  # no router, no sweep, no costs
    ({"base": {}, "dlp_p0.6": {}}, ["eval_heatmap.png"]),  # one top-p is not a sweep
    ({"base": {"cost_ratio": 1.0}, "dlp_p0.3": {}, "dlp_p0.9": {}}, ["eval_heatmap.png", "eval_top_p.png",
                                                                      "eval_cost.png"]),
])
def test_plots_are_skipped_without_their_data(tmp_path, strategies, expected):
    assert plot_results(_result(strategies), tmp_path / "out") == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)


def test_cost_points_share_a_label_only_where_cost_and_score_coincide():
    strategies = {"oracle": {"cost_ratio": 1.104, "average": 0.42}, "dlp_p0.3": {"cost_ratio": 1.101, "average": 0.42},
                  "uniform": {"cost_ratio": 1.36, "average": 0.42}, "base": {"cost_ratio": 1.0, "average": 0.27}}
    assert sorted(cost_points(strategies)) == [(1.0, 0.27, "base"), (1.1, 0.42, "oracle, dlp_p0.3"),
                                               (1.36, 0.42, "uniform")]
