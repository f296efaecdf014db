"""The charts' data, not their pixels, and the log-scale intervals behind them; no MLflow.

Rows are built the way the report builds them (per-seed values -> `aggregate_method` ->
`method_row`) from numbers typed in here, so a linear interval anywhere on that path shows up
in what the charts draw. What was drawn is read back from the matplotlib Axes: the error bars'
line segments, and the label texts' boxes in pixels after a draw. Every expected number is
worked out here with numpy and scipy (gmean, the t quantile), never with our stats module.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from scipy import stats as st

from tasks.analysis.aggregate import SeedRun, aggregate_method, aggregate_metrics
from tasks.analysis.stats import log_interval
from tasks.report import method_row
from tasks.reporting.charts import (
    label_points,
    memory_chart,
    method_colors,
    new_figure,
    pareto_chart,
    time_chart,
)

# method -> (kind, accuracy per seed, train time (s) per seed, peak MB per seed). Two seeds, as
# the quickstart runs: dora, lora and qlora sit on top of each other, and every time spread is
# wide enough for a linear t-interval (12.7 standard errors) to cross 0.
QUICKSTART = {
    "full": ("full", (0.748, 0.752), (38.0, 47.0), (300.0, 420.0)),
    "lora": ("lora", (0.7635, 0.7645), (24.0, 30.0), (200.0, 260.0)),
    "dora": ("dora", (0.7650, 0.7660), (24.5, 30.5), (205.0, 265.0)),
    "qlora": ("qlora", (0.7637, 0.7643), (24.2, 30.2), (190.0, 250.0)),
}
STARRED = {"lora", "dora", "qlora"}  # as the report's Pareto rule stars them on these numbers
T975_1 = st.t.ppf(0.975, 1)  # 12.706: two seeds


def seed_runs(method: str, kind: str, accs, times, mems) -> list[SeedRun]:
    out = []
    for i, (acc, t, mem) in enumerate(zip(accs, times, mems)):
        # The names spelled out, as the child runs hold them.
        metrics = {k: None for k in ("accuracy", "f1_macro", "eval_loss", "precision", "recall",
                                     "step_time_median_s", "eval_time_s", "eval_samples_per_s",
                                     "trainable_params", "total_params", "trainable_pct",
                                     "model_size_mb", "adapter_size_mb", "train_steps",
                                     "other_cpu_share", "memory_avg_mb", "memory_p99_mb")}
        metrics.update({"accuracy": acc, "train_time_s": t, "peak_memory_mb": mem,
                        "samples_per_s": 2000 / t, "tokens_per_s": 2000 * 61.7 / t,
                        "step_time_median_s": t / 125, "eval_time_s": t / 9})
        out.append(SeedRun(f"{method}-{i}", method, kind, i + 1, "FINISHED", 0, None, metrics))
    return out


def rows(table=QUICKSTART, reference="full") -> list[dict]:
    out = [method_row(aggregate_method(m, seed_runs(m, *spec))) for m, spec in table.items()]
    ref_time = st.gmean(table[reference][2])
    for r in out:
        r["pareto_optimal"] = r["method"] in STARRED
        r["train_time_pct_of_ref"] = 100 * st.gmean(table[r["method"]][2]) / ref_time
    return out


def log_ci(values) -> tuple[float, float]:
    """exp of the 95% t-interval of ln(values), by hand."""
    logs = np.log(values)
    half = st.t.ppf(0.975, len(logs) - 1) * np.std(logs, ddof=1) / math.sqrt(len(logs))
    return math.exp(logs.mean() - half), math.exp(logs.mean() + half)


def linear_ci(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    half = st.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v))
    return v.mean() - half, v.mean() + half


# ---------------------------------------------------------------- the interval itself

def test_log_interval_against_a_hand_computed_one():
    iv = log_interval([1.0, 4.0])
    assert iv.mean == pytest.approx(2.0, rel=1e-12) == pytest.approx(st.gmean([1.0, 4.0]))
    mean_log, sd_log = (0.0 + math.log(4.0)) / 2, math.log(4.0) / math.sqrt(2)
    assert iv.std == pytest.approx(sd_log, rel=1e-12)  # the std of ln x
    assert iv.low == pytest.approx(math.exp(mean_log - T975_1 * sd_log / math.sqrt(2)), rel=1e-9)
    assert iv.high == pytest.approx(math.exp(mean_log + T975_1 * sd_log / math.sqrt(2)), rel=1e-9)
    assert iv.scale == "log" and iv.n == 2
    three = [412.3, 399.1, 405.0]
    ref = st.t.interval(0.95, 2, loc=np.log(three).mean(), scale=st.sem(np.log(three)))
    iv = log_interval(three)
    assert iv.mean == pytest.approx(st.gmean(three), rel=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(math.exp(ref[0]), rel=1e-9),
                                 pytest.approx(math.exp(ref[1]), rel=1e-9))


def test_log_interval_edges():
    one = log_interval([3.1])
    assert (one.mean, one.low, one.high) == (3.1, None, None)  # the value itself, no interval
    assert log_interval([]) is None and log_interval([float("nan")]) is None
    # A 0 MB peak has no logarithm: the arithmetic mean, the linear interval clipped at 0.
    zero = log_interval([0.0, 8.0])
    assert zero.scale == "linear" and zero.mean == 4.0
    assert (zero.low, zero.high) == (0.0, pytest.approx(linear_ci([0.0, 8.0])[1], rel=1e-9))


def test_stored_aggregates_of_positive_quantities_never_reach_zero():
    """The metrics an aggregate run stores: times [0.5, 3.0] s, whose linear t-interval would
    run from about −14 s, get exp(t-interval of ln t) instead, for every positive quantity."""
    times, mems = (0.5, 3.0), (40.0, 400.0)
    assert linear_ci(times)[0] < 0 and linear_ci(mems)[0] < 0  # the case this test is about
    agg = aggregate_method("lora", seed_runs("lora", "lora", (0.70, 0.78), times, mems))
    stored = {m.key: m.value for m in aggregate_metrics(agg, None)}
    per_seed = {"train_time_s": times, "peak_memory_mb": mems,
                "samples_per_s": [2000 / t for t in times],
                "tokens_per_s": [2000 * 61.7 / t for t in times],
                "step_time_median_s": [t / 125 for t in times]}
    for key, values in per_seed.items():
        low, high = log_ci(values)
        assert stored[f"{key}_ci_low"] > 0, key
        assert stored[f"{key}_ci_low"] == pytest.approx(low, rel=1e-9), key
        assert stored[f"{key}_ci_high"] == pytest.approx(high, rel=1e-9), key
        assert stored[f"{key}_mean"] == pytest.approx(st.gmean(values), rel=1e-12), key
        assert stored[f"{key}_std"] == pytest.approx(np.std(np.log(values), ddof=1), rel=1e-9)
    # Accuracy stays linear: arithmetic mean, t-interval clipped to [0, 1].
    low, high = linear_ci((0.70, 0.78))
    assert stored["accuracy_mean"] == pytest.approx(0.74, rel=1e-12)
    assert (stored["accuracy_ci_low"], stored["accuracy_ci_high"]) == (
        pytest.approx(max(0.0, low)), pytest.approx(min(1.0, high)))
    # The unaggregated eval time is summarised on the same scale.
    assert agg.stats["eval_time_s"].low == pytest.approx(log_ci([t / 9 for t in times])[0])


# ---------------------------------------------------------------- what the charts draw

def error_segments(ax) -> list[np.ndarray]:
    """Every error bar drawn on the Axes, as its line segment's two end points."""
    return [np.asarray(seg) for c in ax.collections if isinstance(c, LineCollection)
            for seg in c.get_segments()]


def test_no_interval_is_drawn_below_zero():
    table = {**QUICKSTART, "lora": ("lora", (0.7635, 0.7645), (0.5, 3.0), (40.0, 400.0))}
    data = rows(table)
    colors = method_colors(list(table))
    pareto = pareto_chart(data, colors).axes[0]
    segments = error_segments(pareto)
    assert len(segments) == 2 * len(table)  # one time and one accuracy bar per method
    assert min(seg[:, 0].min() for seg in segments) > 0  # x: training time
    # the widest time bar, lora's, is exactly exp(t-interval of ln t) around its geometric mean
    widest = max((seg[:, 0] for seg in segments), key=np.ptp)
    assert sorted(widest) == pytest.approx(log_ci((0.5, 3.0)), rel=1e-9)
    # on the log time axis that interval is drawn symmetric around the geometric mean
    assert pareto.get_xscale() == "log"
    ends = pareto.transData.transform([(x, 0.5) for x in sorted(widest)])[:, 0]
    centre = pareto.transData.transform([(math.sqrt(0.5 * 3.0), 0.5)])[0, 0]
    assert centre - ends[0] == pytest.approx(ends[1] - centre, rel=1e-6)
    for fig, key in ((time_chart(data, None, colors), "train_time_s"),
                     (memory_chart(data, colors), "peak_memory_mb")):
        ends = [seg[:, 0] for seg in error_segments(fig.axes[0])]
        assert len(ends) == len(table) and min(e.min() for e in ends) > 0, key
    relative = time_chart(data, "full", colors).axes[0]  # % of full's time, scaled alike
    assert min(seg[:, 0].min() for seg in error_segments(relative)) > 0


def _disjoint(a, b) -> bool:
    return a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def drawn_labels(fig) -> tuple[list[str], list]:
    """The label texts on the chart's Axes and their boxes in pixels, as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts if t.get_visible() and t.get_text()]
    return [t.get_text() for t in texts], [t.get_window_extent(renderer) for t in texts]


def test_labels_of_near_identical_points_do_not_overlap():
    fig = pareto_chart(rows(), method_colors(list(QUICKSTART)))
    labels, boxes = drawn_labels(fig)
    assert sorted(labels) == sorted(m + (" ★" if m in STARRED else "") for m in QUICKSTART)
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert _disjoint(a, boxes[j]), (labels[i], labels[j], a, boxes[j])
    inside = fig.axes[0].get_window_extent()
    for label, box in zip(labels, boxes):
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, label
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1, label


def test_crowded_points_are_named_once_and_never_overlap():
    """Eight long names on one spot: labelled apart, or named in a legend when they cannot be."""
    table = {f"lora-rank-{2 ** i}-alpha-{2 ** (i + 1)}": ("lora", (0.80, 0.80), (10.0, 10.0),
                                                          (100.0, 100.0)) for i in range(8)}
    data = rows(table, reference=next(iter(table)))
    fig = pareto_chart(data, method_colors(list(table)))
    labels, boxes = drawn_labels(fig)
    legend = fig.axes[0].get_legend()
    named = labels or [t.get_text() for t in legend.get_texts()]
    assert sorted(n.removesuffix(" ★") for n in named) == sorted(table)
    assert all(_disjoint(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_labels_that_cannot_be_set_apart_become_a_legend():
    """Five names wider than a small chart, on one point: no placement separates them, so
    the points are named in a legend and no label (nor its connector) is left on the chart."""
    fig = new_figure(2.4, 1.8)
    ax = fig.add_subplot()
    names = [f"a-long-method-name-number-{i}" for i in range(5)]
    markers = ax.scatter([1.0] * 5, [1.0] * 5)
    kept = label_points(ax, [(1.0, 1.0, n) for n in names], markers,
                        [Line2D([], [], marker="o", linestyle="", label=n) for n in names])
    labels, _ = drawn_labels(fig)
    assert kept == [] and labels == [] and not ax.patches
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
