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

from tasks.analysis.aggregate import Summary
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


def aggregate_means(client: MlflowClient, parent: Run) -> dict[str, dict[str, float]]:
    """method -> summary key -> mean, from the aggregate runs of one benchmark."""
    out = {}
    for run in store.aggregates(client, parent.info.experiment_id, parent.info.run_id):
        if run.info.status != "FINISHED":
            continue
        m = run.data.metrics
        out[run.data.tags.get(names.METHOD, "?")] = {
            key: m[names.agg(key, "mean")] for key in CHECKED if names.agg(key, "mean") in m}
    return out


# ---------------------------------------------------------------- the comparison

def _stdev(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def detect(summary: Summary, past: dict[str, dict[str, dict[str, float]]],
           cfg: RegressionConfig) -> Check:
    """`past`: earlier parent run id -> method -> key -> mean (newest first)."""
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
            baseline = sum(v for _, v in olds) / len(olds)
            se_new = iv.std / math.sqrt(iv.n) if iv.std is not None else 0.0
            noise = math.sqrt(_stdev([v for _, v in olds]) ** 2 + se_new ** 2)
            floor = getattr(cfg, floor_field) * (abs(baseline) if floor_field in RELATIVE else 1)
            if floor_field in ABSOLUTE:
                floor = max(floor, getattr(cfg, ABSOLUTE[floor_field]))
            tolerance = max(floor, cfg.sigmas * noise)
            if direction * (iv.mean - baseline) > tolerance:
                check.flags.append(Flag(name, key, baseline, iv.mean, tolerance,
                                        [r for r, _ in olds]))
    return check


def check_against(client: MlflowClient, summary: Summary, baselines: list[Run],
                  cfg: RegressionConfig) -> Check:
    past = {run.info.run_id: aggregate_means(client, run) for run in baselines}
    empty = [r for r, means in past.items() if not means]
    check = detect(summary, {r: m for r, m in past.items() if m}, cfg)
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
