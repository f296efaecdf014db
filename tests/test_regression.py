"""The alarm's rule on hand-made numbers, each tolerance worked out here by hand: a planted rise
beyond max(floor, 3 sigma) is flagged, jitter under the floors is not, contaminated timings are
not compared, improvements never flag. Time and memory are geometric means, compared on the
log scale; an earlier benchmark stored with arithmetic means (before geometric ones) has its
means recomputed from its child runs (a real MLflow sqlite store)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import test_report as plain
from mlflow import MlflowClient
from scipy import stats as st

from tasks.analysis.aggregate import MethodAggregate, SeedRun, Summary, log_aggregates, summarize
from tasks.analysis.regression import aggregate_means, detect
from tasks.analysis.stats import log_interval, t_interval
from tasks.config.schema import RegressionConfig


def _method(name, accuracy, times, memory, warning=None) -> MethodAggregate:
    """Stats as the aggregates make them: accuracy linear, time and memory on the log scale."""
    runs = [SeedRun(f"{name}{i}", name, "lora", i, "FINISHED", 0, None, {},
                    timing_warning=warning) for i in range(len(times))]
    agg = MethodAggregate(name, "lora", runs)
    agg.stats = {"accuracy": t_interval(accuracy), "train_time_s": log_interval(times),
                 "peak_memory_mb": log_interval(memory)}
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
    baseline = (10.0 * 10.2 * 9.9) ** (1 / 3)  # geometric mean of the earlier geometric means
    s_hist = np.std(np.log([10.0, 10.2, 9.9]), ddof=1)  # on the log scale, as is se_new
    se_new = np.std(np.log([11.9, 12.0, 12.1]), ddof=1) / math.sqrt(3)
    assert flag.old == pytest.approx(baseline, rel=1e-12)
    assert flag.new == pytest.approx(st.gmean([11.9, 12.0, 12.1]), rel=1e-12)
    # max(10% of the baseline, 0.5 s, 3 x noise as a factor): the relative floor wins here
    sigma = baseline * math.expm1(3 * math.hypot(s_hist, se_new))
    assert flag.tolerance == pytest.approx(max(0.1 * baseline, 0.5, sigma), rel=1e-9)
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


def test_a_noisy_time_history_is_compared_on_the_log_scale():
    """History 10, 14, 8 s: 3 sigma of its logs allows up to ×2.33 on its geometric mean, so
    22 s is within the noise, although a linear rule (10.67 s + 3 × 3.06 s) would flag it."""
    past = {f"r{i}": {"m": {"accuracy": 0.9, "train_time_s": t, "peak_memory_mb": 100.0}}
            for i, t in enumerate((10.0, 14.0, 8.0))}
    within = _summary(_method("m", [0.9, 0.9, 0.9], [21.5, 22.0, 22.5], [100.0] * 3))
    assert detect(within, past, RegressionConfig()).flags == []
    assert np.mean([10.0, 14.0, 8.0]) + 3 * np.std([10.0, 14.0, 8.0], ddof=1) < 21.5  # linear
    beyond = _summary(_method("m", [0.9, 0.9, 0.9], [26.0, 27.0, 28.0], [100.0] * 3))
    [flag] = detect(beyond, past, RegressionConfig()).flags
    baseline = st.gmean([10.0, 14.0, 8.0])
    noise = math.hypot(np.std(np.log([10.0, 14.0, 8.0]), ddof=1),
                       np.std(np.log([26.0, 27.0, 28.0]), ddof=1) / math.sqrt(3))
    assert flag.old == pytest.approx(baseline, rel=1e-12)
    assert flag.tolerance == pytest.approx(baseline * math.expm1(3 * noise), rel=1e-9)


def test_an_earlier_run_with_arithmetic_means_is_recomputed_from_its_children(tmp_path):
    """Aggregate runs written before geometric means hold arithmetic `_mean`s and no
    `peft_bench.geometric_means` tag: the alarm compares the geometric means of that run's
    own child runs instead, and says so."""
    uri, parent_id = plain.build_store(tmp_path, failed=None, contaminated=None)
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    ids = log_aggregates(client, summarize(client, parent))
    tag = client.get_run(ids["lora-r8"]).data.tags["peft_bench.geometric_means"]
    assert {"train_time_s", "peak_memory_mb"} <= set(tag.split(","))
    times, mems = plain.METHODS["lora-r8"][2], plain.METHODS["lora-r8"][3]
    fresh = aggregate_means(client, parent)["lora-r8"]
    assert fresh["train_time_s"] == pytest.approx(st.gmean(times), rel=1e-12)
    for run_id in ids.values():  # as an older version wrote them
        client.delete_tag(run_id, "peft_bench.geometric_means")
    client.log_metric(ids["lora-r8"], "train_time_s_mean", float(np.mean(times)), step=0)
    client.log_metric(ids["lora-r8"], "accuracy_mean", 0.5, step=0)
    notes: list[str] = []
    old = aggregate_means(client, parent, notes)["lora-r8"]
    assert old["train_time_s"] == pytest.approx(st.gmean(times), rel=1e-12)
    assert old["train_time_s"] != pytest.approx(np.mean(times), rel=1e-9)
    assert old["peak_memory_mb"] == pytest.approx(st.gmean(mems), rel=1e-12)
    assert old["accuracy"] == 0.5  # accuracy means were arithmetic then too: read as stored
    assert len(notes) == 1 and parent_id in notes[0] and "recomputed" in notes[0]
