"""The regression alarm: a benchmark against the earlier FINISHED runs of the same benchmark
name and config fingerprint (seeds, dispatch and outputs aside) in the same MLflow experiment.

For each method and metric (accuracy: a drop is bad; train time and peak memory: a rise is bad):

    baseline  = mean of the earlier runs' per-method means (the last `window` runs)
    noise     = √(s_hist² + se_new²)   s_hist: std of those means (0 with one earlier run)
                                       se_new: std of the new seeds / √n (0 with one seed)
    tolerance = max(floor, sigmas × noise)   floor: accuracy_drop (absolute), or the larger
                                             of time_rise / memory_rise × baseline (relative)
                                             and time_floor_s / memory_floor_mb (absolute)
    flagged   when the new mean is worse than the baseline by more than the tolerance.

Train time and peak memory are geometric means (tasks/analysis/stats.py `log_interval`), so
they are compared on the log scale, like with like: the baseline is the geometric mean of the
earlier geometric means, s_hist and se_new are stds of logarithms, sigmas × noise is a log
distance, and the floors become ln(1 + rise) and ln(1 + floor / baseline); the flag's
tolerance is given back in seconds or MB. An earlier benchmark whose aggregate runs predate
geometric means (no `names.GEOMETRIC_MEANS` tag: their `_mean` is arithmetic) has its means
recomputed from its own child runs, as a new benchmark's would be; one whose child runs are
gone is compared on accuracy only, with a note.

The floors keep a quiet history (identical numbers, noise 0) from flagging jitter; `sigmas`
keeps a noisy one from flagging noise. Timings that other processes disturbed (the run's
contamination tag) are not compared: the flag would be about the machine, not the code.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Run

from tasks.analysis.aggregate import Summary, method_aggregates
from tasks.analysis.stats import LOG, Interval
from tasks.common import names
from tasks.config.schema import RegressionConfig
from tasks.tracking import store

# summary key -> (direction: +1 when higher is worse, floor field)
CHECKED = {names.ACCURACY: (-1, "accuracy_drop"), names.TRAIN_TIME: (+1, "time_rise"),
           names.PEAK_MEMORY: (+1, "memory_rise")}
RELATIVE = {"time_rise", "memory_rise"}
ABSOLUTE = {"time_rise": "time_floor_s", "memory_rise": "memory_floor_mb"}
MAX_TAG = 7900  # MLflow's tag values hold 8000 characters


@dataclass
class Flag:
    method: str
    metric: str
    old: float        # the history's baseline
    new: float
    tolerance: float  # how far worse it may be before it is flagged
    runs: list[str]   # the earlier parent runs compared with

    @property
    def message(self) -> str:
        rel = f" ({100 * (self.new - self.old) / self.old:+.1f}%)" if self.old else ""
        return (f"{self.method}: {self.metric} {_fmt(self.metric, self.old)} → "
                f"{_fmt(self.metric, self.new)}{rel}, beyond the tolerance "
                f"{_fmt(self.metric, self.tolerance)} over {len(self.runs)} earlier run(s)")


@dataclass
class Check:
    baselines: list[str] = field(default_factory=list)  # parent run ids compared with
    flags: list[Flag] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        body = {"baselines": self.baselines, "flags": [asdict(f) | {"message": f.message}
                                                        for f in self.flags],
                "notes": self.notes}
        text = json.dumps(body)
        while len(text) > MAX_TAG and body["notes"]:
            body["notes"].pop()
            text = json.dumps(body)
        return text

    @staticmethod
    def from_json(text: Optional[str]) -> Optional["Check"]:
        if not text:
            return None
        body = json.loads(text)
        flags = [Flag(**{k: v for k, v in f.items() if k != "message"}) for f in body["flags"]]
        return Check(body.get("baselines", []), flags, body.get("notes", []))


def _fmt(metric: str, v: float) -> str:
    if metric == names.ACCURACY:
        return f"{v:.4f}"
    return f"{v:,.1f} s" if metric == names.TRAIN_TIME else f"{v:,.0f} MB"


# ---------------------------------------------------------------- reading the history

def history(client: MlflowClient, parent: Run, window: int) -> list[Run]:
    """Earlier FINISHED parent runs of the same benchmark and config fingerprint, newest first."""
    tags = parent.data.tags
    # All of them, not the newest few: a check of an older parent needs the runs before it.
    runs = store.parents(client, parent.info.experiment_id,
                         benchmark=tags.get(names.BENCHMARK, ""),
                         config_hash=tags.get(names.CONFIG_HASH, ""), status="FINISHED")
    earlier = [r for r in runs if r.info.run_id != parent.info.run_id
               and (r.info.start_time or 0) <= (parent.info.start_time or 0)]
    return earlier[:window]


def aggregate_means(client: MlflowClient, parent: Run,
                    notes: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """method -> summary key -> mean, from the aggregate runs of one benchmark; the means of
    aggregate runs written before geometric means are recomputed from the child runs."""
    out, stale = {}, False
    for run in store.aggregates(client, parent.info.experiment_id, parent.info.run_id):
        if run.info.status != "FINISHED":
            continue
        m = run.data.metrics
        out[run.data.tags.get(names.METHOD, "?")] = {
            key: m[names.agg(key, "mean")] for key in CHECKED if names.agg(key, "mean") in m}
        stale |= names.GEOMETRIC_MEANS not in run.data.tags
    if stale:
        _recompute(client, parent, out, notes if notes is not None else [])
    return out


def _recompute(client: MlflowClient, parent: Run, means: dict[str, dict[str, float]],
               notes: list[str]) -> None:
    """Replace arithmetic means of log-scale keys by what the child runs give today."""
    methods = method_aggregates(parent, store.children_of(client, parent), [])
    rid = parent.info.run_id
    for name, keys in means.items():
        stats = methods[name].stats if name in methods else {}
        for key in [k for k in keys if k in names.LOG_SCALE]:
            if key in stats:
                keys[key] = stats[key].mean
            else:
                del keys[key]
    notes.append(f"Earlier run {rid} stored arithmetic means of train time and peak memory; "
                 "they were recomputed as geometric means from its child runs (a method "
                 "without finished child runs is compared on accuracy only).")


# ---------------------------------------------------------------- the comparison

def _stdev(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _linear(olds: list[float], iv: Interval, floor_field: str,
            cfg: RegressionConfig) -> tuple[float, float]:
    """(baseline, tolerance) of arithmetic means, in the metric's own unit."""
    baseline = sum(olds) / len(olds)
    se_new = iv.std / math.sqrt(iv.n) if iv.std is not None else 0.0
    noise = math.sqrt(_stdev(olds) ** 2 + se_new ** 2)
    floor = getattr(cfg, floor_field) * (abs(baseline) if floor_field in RELATIVE else 1)
    if floor_field in ABSOLUTE:
        floor = max(floor, getattr(cfg, ABSOLUTE[floor_field]))
    return baseline, max(floor, cfg.sigmas * noise)


def _logarithmic(olds: list[float], iv: Interval, floor_field: str,
                 cfg: RegressionConfig) -> tuple[float, float]:
    """(baseline, tolerance) of geometric means (a rise is bad): the rule on ln(mean), the
    tolerance given back in the metric's unit, as a rise above the baseline."""
    logs = [math.log(v) for v in olds]
    # exp(ln x) can be x one rounding off: an identical history's baseline is x itself.
    baseline = olds[0] if len(set(olds)) == 1 else math.exp(sum(logs) / len(logs))
    se_new = iv.std / math.sqrt(iv.n) if iv.std is not None else 0.0  # iv.std: of ln values
    noise = math.sqrt(_stdev(logs) ** 2 + se_new ** 2)
    floor = math.log1p(getattr(cfg, floor_field))
    if floor_field in ABSOLUTE:
        floor = max(floor, math.log1p(getattr(cfg, ABSOLUTE[floor_field]) / baseline))
    return baseline, baseline * math.expm1(max(floor, cfg.sigmas * noise))


def detect(summary: Summary, past: dict[str, dict[str, dict[str, float]]],
           cfg: RegressionConfig) -> Check:
    """`past`: earlier parent run id -> method -> key -> mean (newest first), each mean on the
    scale the current code computes it on (`aggregate_means`)."""
    check = Check(baselines=list(past))
    if not past:
        return check  # no baselines: the report says there was nothing to compare with
    for name, agg in summary.methods.items():
        for key, (direction, floor_field) in CHECKED.items():
            olds = [(run, means[name][key]) for run, means in past.items()
                    if key in means.get(name, {})]
            iv = agg.stats.get(key)
            if not olds or iv is None:
                continue
            if key == names.TRAIN_TIME and agg.timing_warnings:
                check.notes.append(f"{name}: train time not compared, its timing was "
                                   f"contaminated ({agg.timing_warnings[0]}).")
                continue
            values = [v for _, v in olds]
            # A 0 MB peak has no logarithm: that method's means were arithmetic, then and now.
            geometric = iv.scale == LOG and all(v > 0 for v in values)
            rule = _logarithmic if geometric else _linear
            baseline, tolerance = rule(values, iv, floor_field, cfg)
            if direction * (iv.mean - baseline) > tolerance:
                check.flags.append(Flag(name, key, baseline, iv.mean, tolerance,
                                        [r for r, _ in olds]))
    return check


def check_against(client: MlflowClient, summary: Summary, baselines: list[Run],
                  cfg: RegressionConfig) -> Check:
    notes: list[str] = []
    past = {run.info.run_id: aggregate_means(client, run, notes) for run in baselines}
    empty = [r for r, means in past.items() if not means]
    check = detect(summary, {r: m for r, m in past.items() if m}, cfg)
    check.notes += notes
    if empty:
        check.notes.append(f"Earlier run(s) without aggregate runs were skipped: {empty}.")
    return check


def markdown(check: Check, benchmark: str) -> str:
    """The Prefect artifact (and the report's section) for a check."""
    if not check.flags:
        return f"No regression in `{benchmark}` against {len(check.baselines)} earlier run(s)."
    lines = [f"# Regressions in `{benchmark}`", ""]
    lines += [f"- **{f.message}**" for f in check.flags]
    return "\n".join(lines + ["", "Compared with: " + ", ".join(f"`{r}`" for r in check.baselines)])
