"""The alarm's rule on hand-made numbers, each tolerance worked out here by hand: a planted rise
beyond max(floor, 3 sigma) is flagged, jitter under the floors is not, contaminated timings are
not compared, improvements never flag."""
from __future__ import annotations

import math

import pytest

from tasks.analysis.aggregate import MethodAggregate, SeedRun, Summary
from tasks.analysis.regression import detect
from tasks.analysis.stats import t_interval
from tasks.config.schema import RegressionConfig


def _method(name, accuracy, times, memory, warning=None) -> MethodAggregate:
    runs = [SeedRun(f"{name}{i}", name, "lora", i, "FINISHED", 0, None, {},
                    timing_warning=warning) for i in range(len(times))]
    agg = MethodAggregate(name, "lora", runs)
    agg.stats = {"accuracy": t_interval(accuracy), "train_time_s": t_interval(times),
                 "peak_memory_mb": t_interval(memory)}
    return agg


def _summary(*methods) -> Summary:
    return Summary(parent=None, methods={m.method: m for m in methods}, reference=None,
                   comparisons=[])


def test_a_planted_time_rise_is_flagged_and_jitter_is_not():
    past = {"r1": {"lora": {"accuracy": 0.90, "train_time_s": 10.0, "peak_memory_mb": 103.0}},
            "r2": {"lora": {"accuracy": 0.90, "train_time_s": 10.2, "peak_memory_mb": 103.0}},
            "r3": {"lora": {"accuracy": 0.90, "train_time_s": 9.9, "peak_memory_mb": 103.0}}}
    now = _summary(_method("lora", [0.91, 0.90, 0.92], [11.9, 12.0, 12.1], [110, 114, 112]))
    check = detect(now, past, RegressionConfig())
    assert [(f.method, f.metric) for f in check.flags] == [("lora", "train_time_s")]
    flag = check.flags[0]
    s_hist = math.sqrt(((10.0 - 10.0333) ** 2 + (10.2 - 10.0333) ** 2 + (9.9 - 10.0333) ** 2) / 2)
    se_new = 0.1 / math.sqrt(3)
    assert flag.old == pytest.approx(10.0333, abs=1e-4) and flag.new == pytest.approx(12.0)
    # max(10% of 10.03 s, 0.5 s, 3 x noise): the relative floor wins here
    assert flag.tolerance == pytest.approx(max(1.00333, 0.5, 3 * math.hypot(s_hist, se_new)), rel=1e-3)
    # memory 103 -> 112 MB is under the 32 MB absolute floor: RSS jitter, not flagged


def test_memory_beyond_the_floors_and_accuracy_drops_are_flagged():
    past = {"r1": {"m": {"accuracy": 0.90, "train_time_s": 10.0, "peak_memory_mb": 1000.0}}}
    now = _summary(_method("m", [0.85, 0.86], [10.0, 10.1], [1100.0, 1102.0]))
    flags = {f.metric: f for f in detect(now, past, RegressionConfig()).flags}
    assert set(flags) == {"accuracy", "peak_memory_mb"}
    assert flags["peak_memory_mb"].tolerance >= 50.0  # 5% of 1000 MB beats the 32 MB floor
    better = _summary(_method("m", [0.95, 0.96], [5.0, 5.1], [500.0, 502.0]))
    assert detect(better, past, RegressionConfig()).flags == []  # improvements never flag


def test_contaminated_timing_is_not_compared():
    past = {"r1": {"m": {"accuracy": 0.9, "train_time_s": 10.0, "peak_memory_mb": 100.0}}}
    now = _summary(_method("m", [0.9, 0.9], [30.0, 31.0], [100.0, 100.0],
                           warning="m (seed 1): other processes used 60% of the machine's CPU"))
    check = detect(now, past, RegressionConfig())
    assert check.flags == [] and "train time not compared" in check.notes[0]
    assert detect(now, {}, RegressionConfig()).baselines == []  # no history, nothing compared
