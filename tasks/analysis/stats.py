"""The statistics behind every interval, test and star in the report (scipy.stats underneath).

- `t_interval`: mean, sample std (ddof=1) and the 95% Student-t interval over seeds,
  mean ± t(0.975, n−1) · s/√n. One seed gives no interval (not a zero-width one).
- `log_interval`: the same on the log scale, for quantities that cannot be negative (times,
  memory, throughput): geometric mean exp(mean ln x), std of ln x, and exp of the t-interval of
  ln x, which never reaches 0. A symmetric interval over two seeds is 12.7 standard errors
  wide and drew a training time down to −1.5 s.
- `mcnemar_exact`: McNemar's exact test on paired per-example predictions. Only discordant
  examples count: b = reference right and method wrong, c = the other way round; under
  H0 b ~ Binomial(b + c, ½), two-sided p = min(1, 2·P(X ≤ min(b, c))).
- `paired_difference`: the t-interval of per-seed differences (method − reference): the seeds
  are paired, since both methods trained on the same data order and evaluated the same rows.
- `ratio_interval`: per-seed ratios method/reference through `log_interval` (a ratio's natural
  scale is the log scale).
- `better_beyond_noise`: interval dominance for the Pareto star.

Few seeds give wide intervals (t(0.975, 1) = 12.7 for two seeds): the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from scipy import stats as _st

CONFIDENCE = 0.95
LINEAR, LOG = "linear", "log"


@dataclass(frozen=True)
class Interval:
    """On the `LINEAR` scale: arithmetic mean, std of the values and mean ± half-width. On the
    `LOG` scale: geometric mean, std of ln(values) (≈ the relative spread: 0.05 ≈ 5%) and
    bounds exp(mean ln ± half-width), not symmetric about the mean."""
    mean: float
    std: Optional[float]   # None for one value
    low: Optional[float]   # None when there is no interval (n < 2)
    high: Optional[float]
    n: int
    scale: str = LINEAR

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    def excludes(self, value: float) -> bool:
        return bool(self.has_interval and (self.high < value or self.low > value))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Optional[Interval]:
    """Mean, sample std and Student-t interval of the mean; None for no values. `bounds`
    clips the interval to what the quantity can be (an accuracy lies in [0, 1]): with two
    seeds the t-interval is 12.7 standard errors wide and can leave that range."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return None
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, None, None, 1)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(_st.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, max(bounds[0], mean - half), min(bounds[1], mean + half), n)


@dataclass(frozen=True)
class McNemar:
    b: int  # reference right, method wrong
    c: int  # reference wrong, method right
    p: float

    @property
    def discordant(self) -> int:
        return self.b + self.c


def mcnemar_exact(ref_correct: Sequence[bool], other_correct: Sequence[bool]) -> McNemar:
    """Exact (binomial) McNemar test; the two sequences are per-example correctness on the
    same rows in the same order."""
    if len(ref_correct) != len(other_correct):
        raise ValueError(f"McNemar needs paired predictions: {len(ref_correct)} vs "
                         f"{len(other_correct)} rows")
    b = sum(1 for r, o in zip(ref_correct, other_correct) if r and not o)
    c = sum(1 for r, o in zip(ref_correct, other_correct) if o and not r)
    if b + c == 0:
        return McNemar(0, 0, 1.0)  # identical correctness: no evidence of any difference
    p = _st.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    return McNemar(b, c, min(1.0, float(p)))


def paired_difference(ref: Sequence[float], other: Sequence[float]) -> Optional[Interval]:
    """t-interval of other[i] − ref[i] over the seeds both have (for accuracies: within ±1)."""
    return t_interval([o - r for r, o in zip(ref, other)], bounds=(-1.0, 1.0))


def log_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Optional[Interval]:
    """Geometric mean with exp of the Student-t interval of ln(values); None for no values.
    A value ≤ 0 has no logarithm (a CPU peak of 0 MB: the method grew nothing beyond what the
    process already held): then the arithmetic t-interval, clipped at 0, on the linear scale,
    which `scale` says, rather than a value dropped."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if any(x <= 0 for x in xs):
        return t_interval(xs, confidence, bounds=(0.0, math.inf))
    if len(xs) == 1:  # exactly the value, not exp(ln x) one rounding away from it
        return Interval(xs[0], None, None, None, 1, LOG)
    iv = t_interval([math.log(x) for x in xs], confidence)
    if iv is None:
        return None
    return Interval(math.exp(iv.mean), iv.std, _exp(iv.low), _exp(iv.high), iv.n, LOG)


def ratio_interval(ref: Sequence[float], other: Sequence[float]) -> Optional[Interval]:
    """Geometric-mean ratio other/ref with a t-interval on log ratios (std is on the log scale)."""
    return log_interval([o / r for r, o in zip(ref, other) if r and o and r > 0 and o > 0])


def _exp(v: Optional[float]) -> Optional[float]:
    return None if v is None else math.exp(v)


def _bounds(iv: Interval) -> tuple[float, float]:
    return (iv.low, iv.high) if iv.has_interval else (iv.mean, iv.mean)


def better_beyond_noise(a_time: Interval, a_acc: Interval, b_time: Interval,
                        b_acc: Interval) -> bool:
    """True when method a beats method b on both axes beyond the intervals: a's whole time
    interval lies below b's and a's whole accuracy interval above b's. Without intervals (one
    seed) the points themselves are compared, a strict improvement on both axes."""
    a_t, b_t = _bounds(a_time), _bounds(b_time)
    a_a, b_a = _bounds(a_acc), _bounds(b_acc)
    return a_t[1] < b_t[0] and a_a[0] > b_a[1]


def pareto_beyond_noise(points: dict[str, tuple[Interval, Interval]]) -> set[str]:
    """Names that no other point beats on both time and accuracy beyond the intervals."""
    return {name for name, (t, a) in points.items()
            if not any(better_beyond_noise(t2, a2, t, a)
                       for other, (t2, a2) in points.items() if other != name)}
