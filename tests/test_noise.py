"""benchmarks._noise and how the benchmarks use it: spreads and bootstrap intervals against
hand-computed and plain-numpy values, and WARNINGs that fire on planted bad measurements and
stay quiet on good ones."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import adapters, pipeline_overhead
from benchmarks._noise import REL_IQR_LIMIT, Checks, Ratio, Spread, ratio_of_medians, spread, target_verdict
from tasks.training.machine_load import DEFAULT_THRESHOLD, LoadReading


def test_spread_by_hand():
    s = spread([1, 2, 3, 4, 5, 6, 7, 8, 100])
    assert (s.median, s.q1, s.q3, s.n) == (5, 3, 7, 9)
    assert s.iqr == 4 and s.rel_iqr == pytest.approx(0.8)
    s = spread([13, 10, 12, 11])  # linear interpolation between order statistics
    assert (s.median, s.q1, s.q3) == (11.5, 10.75, 12.25)
    assert s.fmt() == "11.5 [10.8–12.2]"


def test_spread_matches_numpy():
    v = np.random.default_rng(0).lognormal(size=37)
    s = spread(v)
    assert [s.q1, s.median, s.q3] == pytest.approx(np.percentile(v, [25, 50, 75]))
    assert s.rel_iqr == pytest.approx((s.q3 - s.q1) / np.median(v))


def test_bootstrap_interval_by_hand():
    # median of a resample of [1, 3] is 1, 2 or 3 with chances 1/4, 1/2, 1/4; den is always 1,
    # so the 2.5% and 97.5% points of the ratio are exactly 1 and 3.
    r = ratio_of_medians([1, 3], [1], seed=0)
    assert (r.value, r.lo, r.hi) == (2.0, 1.0, 3.0)
    r = ratio_of_medians([6, 6, 6], [2, 2])  # no spread: a point
    assert (r.value, r.lo, r.hi) == (3.0, 3.0, 3.0)


def test_bootstrap_interval_matches_a_plain_numpy_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.normal(12, 1, 25), rng.normal(10, 1, 25)
    r = ratio_of_medians(a, b, seed=3, n_resamples=20000)
    draws = np.random.default_rng(4)
    ia = draws.integers(0, a.size, (20000, a.size))
    ib = draws.integers(0, b.size, (20000, b.size))
    ratios = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    assert r.value == pytest.approx(np.median(a) / np.median(b))
    assert (r.lo, r.hi) == (pytest.approx(lo, abs=0.01), pytest.approx(hi, abs=0.01))
    assert r.lo < r.value < r.hi


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.normal(5, 1, 11), rng.normal(4, 1, 6)
    assert ratio_of_medians(a, b, seed=5) == ratio_of_medians(a, b, seed=5)
    assert ratio_of_medians(a, b, seed=5) != ratio_of_medians(a, b, seed=6)


def test_spread_warning_threshold():
    checks = Checks()
    checks.spread("calm", Spread(100, 96, 104, 9))  # IQR/median 8%
    checks.spread("at the limit", Spread(100, 95, 95 + 100 * REL_IQR_LIMIT, 9))
    assert checks.ok
    checks.spread("wobbly", Spread(100, 94, 106, 9))  # 12%
    assert not checks.ok and "wobbly" in checks.problems[0]


def test_load_warning_threshold():
    checks = Checks()
    checks.load(LoadReading(wall_s=10, cpus=2, other_cpu_s=20 * DEFAULT_THRESHOLD * 0.9))
    assert checks.ok
    checks.load(LoadReading(wall_s=10, cpus=2, other_cpu_s=20 * DEFAULT_THRESHOLD * 1.1))
    assert len(checks.problems) == 1
    checks.load(LoadReading(wall_s=10, cpus=2, other_cpu_s=0, gpu_others=1))
    assert len(checks.problems) == 2


def steps(center: float, n: int = 15, jitter: float = 0.01, seed: int = 0) -> list[float]:
    return list(center * (1 + np.random.default_rng(seed).uniform(-jitter, jitter, n)))


def test_floor_check_fires_on_an_adapter_faster_than_the_floor():
    checks = Checks()
    checks.not_faster_than_floor("lora ours", steps(0.090), steps(0.100, seed=1))
    assert not checks.ok and "faster than the floor" in checks.problems[0]
    out = checks.verdict("ours lora / peft lora = 0.8: met")
    assert out.startswith("WARNING:") and "met" not in out


def test_floor_check_quiet_when_consistent():
    checks = Checks()
    checks.not_faster_than_floor("slower", steps(0.110), steps(0.100, seed=1))
    # Equal within noise (a wide spread on both) is consistent too.
    checks.not_faster_than_floor("equal", steps(0.100, jitter=0.2), steps(0.100, jitter=0.2, seed=1))
    assert checks.ok
    assert checks.verdict("a verdict") == "a verdict"


def test_target_verdict_words():
    assert target_verdict("x", Ratio(0.8, 0.75, 0.85), 0.9, higher_is_better=False).endswith("met")
    assert target_verdict("x", Ratio(1.0, 0.95, 1.05), 0.9, higher_is_better=False).endswith("missed")
    assert "undecided" in target_verdict("x", Ratio(0.9, 0.85, 0.95), 0.9, higher_is_better=False)
    assert target_verdict("x", Ratio(1.3, 1.25, 1.4), 1.2, higher_is_better=True).endswith("met")


# ------------------------------------------------------------- the benchmarks' use of it


def adapter_times(lora_ours: float, floor: float) -> dict:
    times = {}
    for i, m in enumerate(adapters.METHODS):
        scale = 1 + 0.2 * i
        times[(m, "ours")] = steps(lora_ours * scale, seed=3 * i)
        times[(m, "peft")] = steps(0.120 * scale, seed=3 * i + 1)
        times[(m, "floor")] = steps(floor * scale, seed=3 * i + 2)
    return times


QUIET = LoadReading(wall_s=10, cpus=2, other_cpu_s=0.1)
MEM = {(m, impl): 100.0 for m in adapters.METHODS for impl in ("ours", "peft")}


def test_adapters_report_gives_a_verdict_on_consistent_figures():
    out = adapters.report(adapter_times(0.100, 0.095), MEM, {m: QUIET for m in adapters.METHODS})
    assert "WARNING" not in out
    assert "ours lora / peft lora = 0.84" in out and "target <= 0.9: met" in out


def test_adapters_report_warns_on_a_planted_floor_slower_than_the_adapter():
    out = adapters.report(adapter_times(0.100, 0.110), MEM, {m: QUIET for m in adapters.METHODS})
    assert "WARNING: inconsistent: lora ours is faster than the floor" in out
    assert ": met" not in out and ": missed" not in out


def test_adapters_report_warns_on_outside_load():
    busy = LoadReading(wall_s=10, cpus=2, other_cpu_s=10)
    out = adapters.report(adapter_times(0.100, 0.095), MEM, {"lora": busy})
    assert "WARNING: other processes took 50% of the CPU while timing lora" in out


def flow_run(run: str, wall: float, work: float) -> tuple[dict, dict]:
    per = {"lora": {"train_time_s": work * 0.8, "periodic_eval_time_s": work * 0.1,
                    "eval_time_s": work * 0.1}}
    return {"run": run, "wall_s": wall}, per


def test_pipeline_overhead_summary():
    report = [flow_run("cold", 28, 20)] + [flow_run("warm", w, 20) for w in (24, 24.2, 24.4)]
    out = pipeline_overhead.summarize(report, QUIET)
    assert "warm pipeline overhead: 4.20 [4.10–4.30] s" in out
    assert "cold pipeline overhead 8.00 s (one run)  target <= 10 s: met" in out
    assert out.splitlines()[-1].endswith("target <= 5 s: met")
    slow = [flow_run("cold", 40, 20)] + [flow_run("warm", w, 20) for w in (26, 26.2, 26.4)]
    out = pipeline_overhead.summarize(slow, QUIET)
    assert out.splitlines()[-1].endswith("target <= 5 s: missed") and "10 s: missed" in out


def test_pipeline_overhead_warns_on_impossible_and_noisy_runs():
    report = [flow_run("cold", 40, 20)] + [flow_run("warm", w, 20) for w in (15, 30, 31)]
    out = pipeline_overhead.summarize(report, QUIET)
    assert "WARNING: inconsistent: warm run: the methods' train + eval time exceeds" in out
    assert "WARNING: warm pipeline overhead: spread too large" in out
    assert "target <=" not in out.splitlines()[-1]


def test_too_few_rounds_warn():
    checks = Checks()
    checks.spread("one round", spread([1.0]))
    checks.spread("two rounds", spread([1.0, 1.0]))
    assert len(checks.problems) == 2 and "too few" in checks.problems[0]


def trainer_runs(ours_sps: float, theirs_sps: float, ours_acc: float = 0.80) -> list:
    from benchmarks.vs_trainer import Run

    runs = []
    for k in range(3):
        for method in ("full", "lora"):
            for impl, sps, acc in (("ours", ours_sps, ours_acc), ("trainer", theirs_sps, 0.80)):
                t = 480 / (sps * (1 + 0.01 * k))
                runs.append(Run(impl, method, 480, 9000, 24000, t, acc, 0.5))
    return runs


def test_vs_trainer_report_verdict_and_planted_accuracy_gap():
    from benchmarks import vs_trainer

    args = argparse.Namespace(batch_size=16, grouping="none")  # neither side grouped: 1.2
    shapes, rate = [(64, 64)], 1e9
    out = vs_trainer.report(trainer_runs(1300, 1000), QUIET, 400, args, None, shapes, rate)
    assert "WARNING" not in out
    assert "full ours / Trainer samples/s (none) = 1.30" in out and "target >= 1.2: met" in out
    # Same model, same training: a 10-point accuracy gap on 400 rows is not noise.
    out = vs_trainer.report(trainer_runs(1300, 1000, ours_acc=0.70), QUIET, 400, args, None,
                            shapes, rate)
    assert "WARNING: inconsistent: full: accuracy ours 0.700 vs Trainer 0.800" in out
    assert "target >=" not in out
