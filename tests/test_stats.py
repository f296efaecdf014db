"""The statistics against references that do not share our code: scipy.stats called another
way (ttest_1samp's confidence_interval, binomtest's own two-sided p), exact binomial sums
written out with math.comb, and printed Student-t table values."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as st

from tasks.analysis.stats import (
    Interval,
    better_beyond_noise,
    mcnemar_exact,
    paired_difference,
    pareto_beyond_noise,
    ratio_interval,
    t_interval,
)

# Student-t 0.975 quantiles from a printed table (df = 1, 2, 4).
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776}


@pytest.mark.parametrize("values", [[0.90, 0.91, 0.93], [412.3, 399.1, 405.0, 421.7, 388.8],
                                    [1.0, 3.0]])
def test_t_interval_matches_scipy(values):
    iv = t_interval(values)
    ref = st.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert iv.n == len(values)
    assert iv.mean == pytest.approx(np.mean(values), abs=1e-12)
    assert iv.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert iv.low == pytest.approx(ref.low, abs=1e-9)
    assert iv.high == pytest.approx(ref.high, abs=1e-9)
    half = T_TABLE[len(values) - 1] * np.std(values, ddof=1) / math.sqrt(len(values))
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=2e-4)


def test_one_seed_has_no_interval_and_none_is_none():
    iv = t_interval([0.9])
    assert iv == Interval(0.9, None, None, None, 1) and not iv.has_interval
    assert not iv.excludes(0.0)
    assert t_interval([]) is None
    assert t_interval([float("nan")]) is None  # a diverged run's NaN is not a value


def test_bounds_clip_the_interval():
    iv = t_interval([0.5, 0.9], bounds=(0.0, 1.0))  # t(0.975, 1) = 12.7: far outside [0, 1]
    assert iv.low == 0.0 and iv.high == 1.0 and iv.mean == pytest.approx(0.7)
    diff = paired_difference([0.2, 0.9], [0.9, 0.2])  # an accuracy difference lies in [-1, 1]
    assert (diff.low, diff.high) == (-1.0, 1.0)


def _exact_mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact binomial p, written out: 2 · Σ_{k ≤ min(b,c)} C(n,k) / 2^n, capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


@pytest.mark.parametrize("b,c,expected", [(0, 5, 0.0625), (10, 0, 2 / 1024), (3, 3, 1.0),
                                          (7, 2, None), (40, 25, None)])
def test_mcnemar_exact(b, c, expected):
    ref = [True] * b + [False] * c + [True] * 50 + [False] * 30
    other = [False] * b + [True] * c + [True] * 50 + [False] * 30
    m = mcnemar_exact(ref, other)
    assert (m.b, m.c) == (b, c)
    assert m.p == pytest.approx(_exact_mcnemar_p(b, c), rel=1e-12)
    assert m.p == pytest.approx(st.binomtest(b, b + c).pvalue if b + c else 1.0, rel=1e-9)
    if expected is not None:
        assert m.p == pytest.approx(expected, rel=1e-12)


def test_mcnemar_identical_predictions_and_random_pairs():
    same = [True, False, True, True]
    assert mcnemar_exact(same, same).p == 1.0 and mcnemar_exact(same, same).discordant == 0
    rng = random.Random(7)
    for _ in range(20):
        a = [rng.random() < 0.8 for _ in range(300)]
        b = [rng.random() < 0.75 for _ in range(300)]
        m = mcnemar_exact(a, b)
        assert m.b == sum(x and not y for x, y in zip(a, b))
        assert m.c == sum(y and not x for x, y in zip(a, b))
        assert m.p == pytest.approx(_exact_mcnemar_p(m.b, m.c), rel=1e-9)
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact([True], [True, False])


def test_paired_difference_pairs_by_seed():
    ref, other = [0.91, 0.92, 0.90], [0.905, 0.90, 0.89]
    iv = paired_difference(ref, other)
    diffs = np.subtract(other, ref)
    ci = st.ttest_rel(other, ref).confidence_interval(0.95)
    assert iv.mean == pytest.approx(diffs.mean(), abs=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))


def test_ratio_interval_is_geometric():
    ref, other = [400.0, 410.0, 420.0], [200.0, 230.0, 205.0]
    iv = ratio_interval(ref, other)
    logs = np.log(np.divide(other, ref))
    ci = st.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    assert iv.mean == pytest.approx(math.exp(logs.mean()), rel=1e-12)
    assert iv.low == pytest.approx(math.exp(ci.low), rel=1e-9)
    assert iv.high == pytest.approx(math.exp(ci.high), rel=1e-9)
    one = ratio_interval([10.0], [5.0])
    assert one.mean == pytest.approx(0.5) and not one.has_interval


def _iv(mean, half=None):
    if half is None:
        return Interval(mean, None, None, None, 1)
    return Interval(mean, half, mean - half, mean + half, 3)


def test_dominance_beyond_noise():
    # a: faster and more accurate, intervals apart on both axes -> beats b
    assert better_beyond_noise(_iv(100, 5), _iv(0.9, 0.01), _iv(200, 5), _iv(0.8, 0.01))
    # accuracy intervals overlap -> not beyond the noise
    assert not better_beyond_noise(_iv(100, 5), _iv(0.9, 0.06), _iv(200, 5), _iv(0.85, 0.06))
    # one seed: the points compare strictly
    assert better_beyond_noise(_iv(100), _iv(0.9), _iv(200), _iv(0.8))
    assert not better_beyond_noise(_iv(100), _iv(0.9), _iv(100), _iv(0.8))
    points = {"full": (_iv(400, 10), _iv(0.91, 0.005)), "lora": (_iv(200, 10), _iv(0.90, 0.005)),
              "slow-bad": (_iv(500, 10), _iv(0.80, 0.005)),
              "noisy": (_iv(450, 300), _iv(0.85, 0.2))}
    assert pareto_beyond_noise(points) == {"full", "lora", "noisy"}


def test_identical_differences_on_every_seed_are_decided_by_mcnemar():
    """Two seeds, +2.0 points each (on 200 rows: as computed in floats, 0.85 - 0.83 and 0.86 -
    0.84): the t-interval has no width and would exclude 0. McNemar's exact test on each seed
    (scipy's binomial test as the oracle) decides instead: 6 against 2 discordant rows is
    p ≈ 0.29, not significant; 30 against 2 is significant."""
    from tasks.analysis.aggregate import Comparison
    from tasks.analysis.stats import McNemar

    diff = paired_difference([0.83, 0.84], [0.85, 0.86])
    assert diff.has_interval and diff.excludes(0.0)  # the degenerate interval alone says yes
    p_weak = st.binomtest(2, 8, 0.5).pvalue
    weak = {1: McNemar(2, 6, p_weak), 2: McNemar(2, 6, p_weak)}
    c = Comparison("m", "ref", [1, 2], weak, diff, None, None)
    assert c.no_spread and c.significant is False and "McNemar" in c.basis
    p_strong = st.binomtest(2, 32, 0.5).pvalue
    assert p_strong < 0.05
    strong = {1: McNemar(2, 30, p_strong), 2: McNemar(2, 30, p_strong)}
    assert Comparison("m", "ref", [1, 2], strong, diff, None, None).significant is True
    # No predictions logged: nothing decides it.
    assert Comparison("m", "ref", [1, 2], {}, diff, None, None).significant is None
    # A real spread keeps the t-interval as the basis.
    spread = paired_difference([0.83, 0.84, 0.80], [0.85, 0.87, 0.84])
    s = Comparison("m", "ref", [1, 2, 3], weak, spread, None, None)
    assert not s.no_spread and s.significant is spread.excludes(0.0) and "t-interval" in s.basis
