"""How far a benchmark's figures can be trusted: spread over repeated rounds, a bootstrap
interval for ratios, the load other processes put on the machine, and consistency checks.

A figure without its spread invites reading noise as a result. Every benchmark here measures in
interleaved rounds, prints each figure as its median with the inter-quartile range, a ratio of
medians with a seeded bootstrap 95% interval, and the CPU share other processes took meanwhile
(`tasks.training.machine_load`). When the spread or the outside load is too large, or the figures
contradict each other (an adapter faster than the same model without one), `Checks.verdict`
prints WARNING lines instead of a verdict.

Pure python/numpy/scipy: no torch, no Prefect, so tests and every benchmark can import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from tasks.training.machine_load import DEFAULT_THRESHOLD, LoadReading

# Above this inter-quartile range / median a median is too wobbly to carry a verdict: most
# targets here are 10-20% apart from the alternative they are compared with.
REL_IQR_LIMIT = 0.10
# Quartiles of fewer measurements say nothing about the spread.
MIN_ROUNDS = 3


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated measurements (numpy's linear interpolation)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR / |median|; infinite for a zero median with any spread."""
        if self.median == 0:
            return 0.0 if self.iqr == 0 else math.inf
        return self.iqr / abs(self.median)

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        """`12.3 [11.9–12.8]` (median [q1–q3]), values multiplied by `scale`."""
        m, a, b = (v * scale for v in (self.median, self.q1, self.q3))
        return f"{m:.{digits}f} [{a:.{digits}f}–{b:.{digits}f}]"


def spread(values: Sequence[float]) -> Spread:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("spread of no measurements")
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return Spread(float(med), float(q1), float(q3), int(v.size))


@dataclass(frozen=True)
class Ratio:
    """A ratio of medians with a bootstrap interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def fmt(self, digits: int = 2) -> str:
        return (f"{self.value:.{digits}f} [{self.level:.0%} CI "
                f"{self.lo:.{digits}f}–{self.hi:.{digits}f}]")


def _median_ratio(num, den, axis=-1):
    return np.median(num, axis=axis) / np.median(den, axis=axis)


def ratio_of_medians(num: Sequence[float], den: Sequence[float], seed: int = 0,
                     n_resamples: int = 4000, level: float = 0.95) -> Ratio:
    """median(num) / median(den) with a percentile bootstrap interval, each sample resampled
    on its own (they need not pair up). Seeded: the same data give the same interval.

    Percentile rather than BCa: with the handful of rounds a benchmark affords, BCa's
    jackknife is degenerate more often than not."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio of medians needs measurements on both sides")
    value = float(_median_ratio(a, b))
    # scipy wants two observations a side; a single value resamples to itself, as does it twice.
    a, b = (np.repeat(x, 2) if x.size == 1 else x for x in (a, b))
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread: every resample gives the same ratio
        return Ratio(value, value, value, level)
    res = stats.bootstrap((a, b), _median_ratio, vectorized=True, paired=False,
                          n_resamples=n_resamples, confidence_level=level,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Ratio(value, float(ci.low), float(ci.high), level)


def describe_load(reading: Optional[LoadReading], what: str = "while timing") -> str:
    if reading is None:
        return f"machine load {what}: not measured"
    line = (f"machine load {what}: other processes took {reading.other_share:.0%} of "
            f"{reading.cpus} CPU(s) over {reading.wall_s:.1f} s "
            f"(flagged above {DEFAULT_THRESHOLD:.0%})")
    if reading.gpu_others:
        line += f"; {reading.gpu_others} other process(es) on the GPU"
    return line


@dataclass
class Checks:
    """Collects every reason the figures cannot carry a verdict; `verdict` prints them as
    WARNING lines in place of the verdict."""

    rel_iqr_limit: float = REL_IQR_LIMIT
    load_threshold: float = DEFAULT_THRESHOLD
    problems: list[str] = field(default_factory=list)

    def spread(self, name: str, s: Spread) -> Spread:
        if s.n < MIN_ROUNDS:
            self.problems.append(f"{name}: {s.n} round(s) only, too few to judge the spread "
                                 f"(at least {MIN_ROUNDS})")
        elif s.rel_iqr > self.rel_iqr_limit:
            self.problems.append(f"{name}: spread too large (IQR/median {s.rel_iqr:.1%} > "
                                 f"{self.rel_iqr_limit:.0%} over {s.n} rounds)")
        return s

    def load(self, reading: Optional[LoadReading], what: str = "while timing") -> None:
        if reading is None:
            return
        if reading.other_share > self.load_threshold:
            self.problems.append(f"other processes took {reading.other_share:.0%} of the CPU "
                                 f"{what} (> {self.load_threshold:.0%})")
        if reading.gpu_others:
            self.problems.append(f"{reading.gpu_others} other process(es) used the GPU {what}")

    def consistent(self, ok: bool, message: str) -> bool:
        if not ok:
            self.problems.append(f"inconsistent: {message}")
        return ok

    def not_faster_than_floor(self, name: str, times: Sequence[float],
                              floor_times: Sequence[float], seed: int = 0) -> Ratio:
        """The floor (same model, no adapter) bounds every adapter from below; an adapter
        faster than it beyond noise (its whole interval of time/floor under 1) means the
        measurement, not the adapter, is off."""
        r = ratio_of_medians(times, floor_times, seed=seed)
        self.consistent(r.hi >= 1.0, f"{name} is faster than the floor beyond noise "
                                     f"(time / floor = {r.fmt()})")
        return r

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self, text: str) -> str:
        """`text` when every check passed, else WARNING lines and no verdict."""
        if self.ok:
            return text
        lines = [f"WARNING: {p}" for p in self.problems]
        return "\n".join(lines + ["WARNING: no verdict from these figures; rerun on a quiet "
                                  "machine or with more rounds"])


def target_verdict(name: str, r: Ratio, target: float, higher_is_better: bool) -> str:
    """'met' only when the whole interval is on the good side of the target, 'missed' only
    when it is wholly on the bad side; otherwise the data cannot tell."""
    good = (r.lo >= target) if higher_is_better else (r.hi <= target)
    bad = (r.hi < target) if higher_is_better else (r.lo > target)
    word = "met" if good else "missed" if bad else "undecided (interval straddles the target)"
    sign = ">=" if higher_is_better else "<="
    return f"{name} = {r.fmt()}  target {sign} {target}: {word}"
