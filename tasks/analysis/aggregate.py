"""Per-method aggregates over seeds and the paired comparison with the reference method,
computed from the child runs as MLflow holds them (never from the pipeline's memory), so the
aggregate runs, the report and the CLI all show the same numbers, and an old benchmark can be
summarised again from its parent run id alone.

Where the aggregates live: one *aggregate run* per method, at the top level of the experiment
(tagged `peft_bench.role = aggregate` and with the benchmark's parent run id), holding
`accuracy_mean`, `accuracy_ci_low`, … . MLflow's runs page hides nested runs until their
parent row is expanded, and its chart view draws one bar per visible run: top-level runs with
the same metric names make `accuracy_mean` a per-method bar chart on first load, and two
nightly benchmarks' aggregate runs compare side by side in the same chart.

Scales: times, memory and throughput (`names.LOG_SCALE`) are summarised on the log scale
(geometric mean, interval exp(t-interval of ln x), never ≤ 0), accuracies and loss on the
linear scale, clipped to what they can be. Each Interval says its scale; each aggregate run
lists its geometric means in the `names.GEOMETRIC_MEANS` tag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag
from mlflow.utils.time import get_current_time_millis

from tasks.analysis import predictions
from tasks.analysis.stats import (
    LOG,
    Interval,
    McNemar,
    log_interval,
    mcnemar_exact,
    paired_difference,
    ratio_interval,
    t_interval,
)
from tasks.common import names
from tasks.tracking import runs, store


@dataclass
class SeedRun:
    """One child run: one method under one seed."""

    run_id: str
    method: str
    kind: str
    seed: Optional[int]
    status: str
    start_time: int
    error: Optional[str]
    metrics: dict[str, Optional[float]]  # summary key -> value (names.CHILD_METRICS keys)
    timing_warning: Optional[str] = None
    artifact_uri: str = ""
    end_time: int = 0

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"


@dataclass
class MethodAggregate:
    method: str
    kind: str
    runs: list[SeedRun]                      # latest run per seed, in seed order
    stats: dict[str, Interval] = field(default_factory=dict)  # summary key -> over seeds

    @property
    def finished(self) -> list[SeedRun]:
        return [r for r in self.runs if r.finished]

    @property
    def failures(self) -> list[SeedRun]:
        return [r for r in self.runs if not r.finished]

    @property
    def status(self) -> str:
        if not self.failures:
            return "FINISHED"
        return "PARTIAL" if self.finished else "FAILED"

    @property
    def timing_warnings(self) -> list[str]:
        return [r.timing_warning for r in self.finished if r.timing_warning]

    def mean(self, key: str) -> Optional[float]:
        iv = self.stats.get(key)
        return None if iv is None else iv.mean


@dataclass
class Comparison:
    """A method against the reference, paired by seed."""

    method: str
    reference: str
    seeds: list[int]
    mcnemar: dict[int, McNemar]
    acc_diff: Optional[Interval]
    time_ratio: Optional[Interval]
    memory_ratio: Optional[Interval]

    @property
    def significant(self) -> Optional[bool]:
        """Across seeds: the 95% interval of the accuracy difference excludes 0. With one seed
        there is no interval, and with seeds whose differences are identical (two seeds, +2.0
        points each) it has no width: it says nothing of the noise, and would call any such
        difference significant. Then McNemar's exact test decides, on every seed (p < 0.05)."""
        if self.acc_diff is None:
            return None
        if self.acc_diff.has_interval and not self.no_spread:
            return self.acc_diff.excludes(0.0)
        if self.mcnemar and (len(self.mcnemar) == 1 or self.no_spread):
            return all(m.p < 0.05 for m in self.mcnemar.values())
        return None

    @property
    def no_spread(self) -> bool:
        """Identical differences on every seed. Accuracies on N rows differ in steps of 1/N, so
        a std this small is floating-point rounding, never a real spread."""
        d = self.acc_diff
        return d is not None and d.has_interval and d.std is not None and d.std < 1e-9

    @property
    def basis(self) -> str:
        if self.no_spread and self.mcnemar:
            return (f"McNemar's exact test on each of {len(self.mcnemar)} seeds (their "
                    "differences are identical: the t-interval has no width)")
        if self.acc_diff is not None and self.acc_diff.has_interval and not self.no_spread:
            return f"95% t-interval over {self.acc_diff.n} seeds"
        return "McNemar's exact test, one seed" if self.mcnemar else "no paired data"


@dataclass
class GridPoint:
    """One grid run of a sweep, scored on the selection split."""

    run_id: str
    method: str
    point: dict                      # the swept values, e.g. {"lr": 0.001, "rank": 8}
    label: str                       # "lr=0.001,rank=8"
    status: str
    chosen: bool
    reused_from: Optional[str]       # the earlier run it was copied from, if it was
    metrics: dict[str, Optional[float]]  # summary key -> value, as SeedRun.metrics


@dataclass
class Summary:
    parent: Run
    methods: dict[str, MethodAggregate]      # config order
    reference: Optional[str]
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)
    grids: dict[str, list[GridPoint]] = field(default_factory=dict)  # method -> its grid runs
    reused: list[str] = field(default_factory=list)  # final runs copied from earlier ones


# ---------------------------------------------------------------- reading the children

def _finite(v) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def seed_run(run: Run) -> SeedRun:
    tags, metrics = run.data.tags, run.data.metrics
    finished = run.info.status == "FINISHED"
    seed = tags.get(names.SEED) or run.data.params.get("training.seed")
    # A run that did not finish has no result to compare; partial numbers would mislead.
    values = {k: (_finite(metrics.get(m)) if finished else None)
              for k, m in names.CHILD_METRICS.items()}
    return SeedRun(
        run_id=run.info.run_id, method=tags.get(names.METHOD) or run.info.run_name or "?",
        kind=tags.get(names.METHOD_KIND, "unknown"),
        seed=int(seed) if seed not in (None, "") else None, status=run.info.status,
        start_time=run.info.start_time or 0,
        error=tags.get(names.ERROR) or (None if finished else "the run did not finish"),
        metrics=values, timing_warning=tags.get(names.TIMING_WARNING),
        artifact_uri=run.info.artifact_uri or "", end_time=run.info.end_time or 0)


def _method_order(parent: Run, runs: list[SeedRun]) -> list[str]:
    declared = [m for m in parent.data.tags.get(names.METHODS, "").split(",") if m]
    seen = list(dict.fromkeys(r.method for r in runs))
    return [m for m in declared if m in seen] + [m for m in seen if m not in declared]


def _latest_per_seed(runs: list[SeedRun], notes: list[str]) -> list[SeedRun]:
    """A retried (method, seed) leaves several child runs; the latest one stands for it."""
    by_seed: dict[Optional[int], list[SeedRun]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    for seed, rs in by_seed.items():
        if len(rs) > 1:
            notes.append(f"Method {rs[-1].method}, seed {seed}, has {len(rs)} child runs; the "
                         f"latest ({rs[-1].run_id}) is reported.")
    return [rs[-1] for _, rs in sorted(by_seed.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]


# Shares (of the evaluation rows, of the machine): their intervals are clipped to [0, 1]; a
# loss is never negative. Times, memory and throughput are on the log scale instead.
UNIT_KEYS = (names.ACCURACY, names.F1_MACRO, names.PRECISION, names.RECALL,
             names.OTHER_CPU_SHARE)
NON_NEGATIVE_KEYS = (names.FINAL_LOSS,)


def over_seeds(key: str, values: list[float]) -> Optional[Interval]:
    """The one summary over seeds of a summary key, on the scale that key lives on."""
    if key in names.LOG_SCALE:
        return log_interval(values)
    bounds = ((0.0, 1.0) if key in UNIT_KEYS else
              (0.0, math.inf) if key in NON_NEGATIVE_KEYS else (-math.inf, math.inf))
    return t_interval(values, bounds=bounds)


def aggregate_method(method: str, runs: list[SeedRun]) -> MethodAggregate:
    agg = MethodAggregate(method, runs[0].kind, runs)
    for key in names.CHILD_METRICS:
        iv = over_seeds(key, [r.metrics[key] for r in agg.finished if r.metrics[key] is not None])
        if iv is not None:
            agg.stats[key] = iv
    return agg


def method_aggregates(parent: Run, children: list[Run],
                      notes: list[str]) -> dict[str, MethodAggregate]:
    """Per method (config order), its latest run per seed and their statistics, from the
    parent's child runs as MLflow holds them (`store.children_of`)."""
    runs = [seed_run(r) for r in children]
    return {name: aggregate_method(name, _latest_per_seed([r for r in runs if r.method == name],
                                                          notes))
            for name in _method_order(parent, runs)}


def geometric_keys(agg: MethodAggregate) -> list[str]:
    """The aggregated keys whose mean is geometric (a key with a 0 among its seeds is not)."""
    return [k for k in names.AGGREGATED if k in agg.stats and agg.stats[k].scale == LOG]


# ---------------------------------------------------------------- paired comparison

def compare(client: MlflowClient, ref: MethodAggregate, other: MethodAggregate,
            notes: list[str]) -> Comparison:
    pairs = [(r, o) for r in ref.finished for o in other.finished if r.seed == o.seed]
    mcnemar = {}
    for r, o in pairs:
        a = predictions.correct(client, r.run_id, r.artifact_uri, r.end_time)
        b = predictions.correct(client, o.run_id, o.artifact_uri, o.end_time)
        if a is None or b is None:
            notes.append(f"No predictions for seed {r.seed} of {ref.method} or "
                         f"{other.method}: no McNemar test for that seed.")
        elif len(a) != len(b) or not a["label"].equals(b["label"]):
            notes.append(f"{ref.method} and {other.method} were evaluated on different rows "
                         f"for seed {r.seed}: no McNemar test for that seed.")
        else:
            mcnemar[r.seed] = mcnemar_exact((a["label"] == a["prediction"]).tolist(),
                                            (b["label"] == b["prediction"]).tolist())

    def col(key: str, runs: list[SeedRun]) -> list[Optional[float]]:
        return [x.metrics[key] for x in runs]

    refs, others = [r for r, _ in pairs], [o for _, o in pairs]

    def both(key: str) -> tuple[list[float], list[float]]:
        kept = [(a, b) for a, b in zip(col(key, refs), col(key, others))
                if a is not None and b is not None]
        return [a for a, _ in kept], [b for _, b in kept]

    return Comparison(
        method=other.method, reference=ref.method, seeds=[r.seed for r in refs], mcnemar=mcnemar,
        acc_diff=paired_difference(*both(names.ACCURACY)),
        time_ratio=ratio_interval(*both(names.TRAIN_TIME)),
        memory_ratio=ratio_interval(*both(names.PEAK_MEMORY)))


def grid_points(client: MlflowClient, parent: Run) -> dict[str, list[GridPoint]]:
    """The sweep's grid runs, per method (children of the methods' runs), in start order."""
    import json

    out: dict[str, list[GridPoint]] = {}
    eid = parent.info.experiment_id
    for m in store.aggregates(client, eid, parent.info.run_id):
        for r in store.children(client, eid, m.info.run_id, tags={names.ROLE: names.ROLE_GRID}):
            s = seed_run(r)
            out.setdefault(s.method, []).append(GridPoint(
                r.info.run_id, s.method, json.loads(r.data.tags.get(names.POINT_JSON, "{}")),
                r.data.tags.get(names.POINT, "default"), r.info.status,
                r.data.tags.get(names.CHOSEN) == "true", r.data.tags.get(names.REUSED_FROM),
                s.metrics))
    return out


def summarize(client: MlflowClient, parent: Run) -> Summary:
    """Everything the report and the aggregate runs need, from the parent's child runs (and,
    for a sweep, the grid runs under the methods' runs)."""
    notes: list[str] = []
    children = store.children_of(client, parent)
    methods = method_aggregates(parent, children, notes)
    wanted = parent.data.tags.get(names.REFERENCE)
    reference = wanted if wanted in methods else next(iter(methods), None)
    comparisons = []
    if reference is not None and methods[reference].finished:
        ref = methods[reference]
        comparisons = [compare(client, ref, m, notes) for name, m in methods.items()
                       if name != reference and m.finished]
    elif reference is not None:
        notes.append(f"The reference method {reference} did not finish under any seed: no "
                     f"paired comparison.")
    reused = [r.info.run_id for r in children if names.REUSED_FROM in r.data.tags]
    return Summary(parent, methods, reference, comparisons, notes, grid_points(client, parent),
                   reused)


# ---------------------------------------------------------------- the aggregate runs

def aggregate_metrics(agg: MethodAggregate, comparison: Optional[Comparison]) -> list[Metric]:
    now, out = get_current_time_millis(), []
    for key in names.AGGREGATED:
        iv = agg.stats.get(key)
        if iv is None:
            continue
        values = {"mean": iv.mean, "std": iv.std, "ci_low": iv.low, "ci_high": iv.high}
        out += [Metric(names.agg(key, s), float(v), now, 0) for s, v in values.items()
                if v is not None]
    for key in (names.TRAINABLE_PARAMS, names.TRAINABLE_PCT, names.MODEL_SIZE, names.ADAPTER_SIZE):
        if key in agg.stats:  # the same under every seed: the mean is the value
            out.append(Metric(names.CHILD_METRICS[key], agg.stats[key].mean, now, 0))
    out.append(Metric(names.N_SEEDS, float(len(agg.finished)), now, 0))
    if comparison is not None:
        for key, iv in ((names.ACC_DIFF, comparison.acc_diff),
                        (names.TIME_RATIO, comparison.time_ratio),
                        (names.MEMORY_RATIO, comparison.memory_ratio)):
            if iv is None:
                continue
            values = {"mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high}
            out += [Metric(names.paired(key, s), float(v), now, 0) for s, v in values.items()
                    if v is not None]
        out += [Metric(names.MCNEMAR_P, m.p, now, seed) for seed, m in comparison.mcnemar.items()]
    return out


def method_note(agg: MethodAggregate, comparison: Optional[Comparison], bench: str) -> str:
    """The aggregate run's description: its means over seeds and its verdict."""
    def cell(key: str, fmt: str) -> str:
        iv = agg.stats.get(key)
        if iv is None:
            return "—"
        if not iv.has_interval:
            return fmt.format(iv.mean)
        if iv.scale == LOG:  # not symmetric about the mean: both bounds
            return f"{fmt.format(iv.mean)} [{fmt.format(iv.low)}, {fmt.format(iv.high)}]"
        return f"{fmt.format(iv.mean)} ± {fmt.format((iv.high - iv.low) / 2)}"
    lines = [f"**{agg.method}** ({agg.kind}) in benchmark `{bench}`, over "
             f"{len(agg.finished)} of {len(agg.runs)} seeds: accuracy mean ± 95% CI; train time "
             "and peak memory geometric mean [95% CI on the log scale].", "",
             "| accuracy | train s | peak MB |", "|---:|---:|---:|",
             f"| {cell(names.ACCURACY, '{:.4f}')} | {cell(names.TRAIN_TIME, '{:.1f}')} | "
             f"{cell(names.PEAK_MEMORY, '{:.0f}')} |"]
    if comparison is not None and comparison.acc_diff is not None:
        d = comparison.acc_diff
        ci = f" [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" if d.has_interval else ""
        sig = {True: "significant", False: "not significant", None: "undecided"}[comparison.significant]
        lines += ["", f"vs {comparison.reference}: {100 * d.mean:+.1f} pt{ci}, {sig}"]
    return "\n".join(lines)


def log_aggregates(client: MlflowClient, summary: Summary) -> dict[str, str]:
    """One top-level run per method (created once per benchmark, updated on a re-run), ending
    FINISHED, or FAILED when no seed of the method finished. Returns method -> run id."""
    parent = summary.parent
    by_method = {c.method: c for c in summary.comparisons}
    existing = store.aggregates_by_method(client, parent.info.experiment_id, parent.info.run_id)
    bench = parent.data.tags.get(names.BENCHMARK, parent.info.run_name)
    out = {}
    for name, agg in summary.methods.items():
        tags = {names.ROLE: names.ROLE_AGGREGATE, names.METHOD: name, names.METHOD_KIND: agg.kind,
                names.BENCHMARK: bench, names.BENCHMARK_RUN: parent.info.run_id,
                names.REFERENCE: summary.reference or "",
                names.CONFIG_HASH: parent.data.tags.get(names.CONFIG_HASH, ""),
                names.GEOMETRIC_MEANS: ",".join(geometric_keys(agg))}
        if agg.failures:
            tags[names.ERROR] = "; ".join(f"seed {r.seed}: {r.error}" for r in agg.failures)[:5000]
        tags[names.RUN_NOTE] = method_note(agg, by_method.get(name), bench)
        run_id = existing.get(name) or runs.new_run(client, parent.info.experiment_id,
                                                    f"{name} [{bench}]", tags)
        client.log_batch(run_id, metrics=aggregate_metrics(agg, by_method.get(name)),
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(run_id, "FINISHED" if agg.finished else "FAILED")
        out[name] = run_id
    return out
