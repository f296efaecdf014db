"""`peft-bench plan CONFIG`: the runs a benchmark would start, and how long they would take,
without training anything.

The estimate comes from the MLflow history of the same model and data (earlier runs whose
parent has the same data digest, else the same model and data source): per method kind, the
median seconds per optimiser step times the steps this config plans, plus the median
evaluation time. Grid points and final runs go as two waves: on N workers each wave takes
about ceil(runs / N) runs' time. Start-up and logging add a few seconds a run on top.

`sweep.strategy: halving` stops points early, so its grid costs less than a grid's, by an amount
that depends on how the points score. `plan` gives three figures per method (`halving_budget`):
- at most N x R steps (N points, R steps each): the order in which every point beats all
  before it at every rung, so none is stopped (with `bootstrap_count` b, the first b points are
  stopped at the first rung whatever they score);
- at least R + (N - 1) x r1: the best point first, every other stopped at the first rung r1;
- expected: the mean over 2,000 random orders of the points (the GridSampler's order is random),
  assuming the points rank alike at every rung, replaying Optuna's rule (a point goes on from a
  rung when it is in the top 1/reduction_factor of the points that reached it so far, the best
  one while fewer than reduction_factor have). A rung's decision waits for the first periodic
  evaluation at or after it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from rich.table import Table

from tasks.common import names
from tasks.config.schema import BenchConfig


@dataclass
class Estimate:
    per_step_s: float
    eval_s: float
    runs_seen: int


def history(cfg: BenchConfig, digest: str) -> dict[str, Estimate]:
    """method kind -> timing, from FINISHED runs on the same data and model; {} if none."""

    from tasks.tracking import runs, store
    from tasks.tracking.lifecycle import sqlite_path

    db = sqlite_path(cfg.tracking.tracking_uri)
    if db is not None and not db.exists():
        return {}  # no history, and `plan` creates no store
    client = runs.client(cfg.tracking)
    eid = store.experiment_id(client, cfg.tracking.experiment)
    if eid is None:
        return {}
    parents = store.parents(client, eid, limit=50, data_digest=digest)
    if not parents:
        parents = [p for p in store.parents(client, eid, limit=200)
                   if p.data.params.get("model.name_or_path") == cfg.model.name_or_path
                   and p.data.params.get("data.source") == cfg.data.source]
    samples: dict[str, list[tuple[float, float]]] = {}
    for parent in parents:
        for run in store.children(client, eid, parent.info.run_id, status="FINISHED"):
            m = run.data.metrics
            if m.get(names.TRAIN_STEPS) and names.TRAIN_TIME in m:
                samples.setdefault(run.data.tags.get(names.METHOD_KIND, "?"), []).append(
                    (m[names.TRAIN_TIME] / m[names.TRAIN_STEPS],
                     m.get(names.EVAL_TIME, 0.0) + m.get(names.PERIODIC_EVAL_TIME, 0.0)))
    return {kind: Estimate(statistics.median(s for s, _ in xs), statistics.median(e for _, e in xs),
                           len(xs)) for kind, xs in samples.items()}


def planned_steps(cfg: BenchConfig, train_rows: int, point: Optional[dict] = None) -> int:
    from tasks.train import total_steps

    training = cfg.training.model_copy(update={k: v for k, v in (point or {}).items()
                                               if k in ("epochs", "max_steps")})
    world = training.distributed.world_size if training.distributed else 1
    return total_steps(training, math.ceil(train_rows / (training.batch_size * world)))


def jobs(cfg: BenchConfig) -> list[tuple[str, str, Optional[dict], str]]:
    """(phase, method, point, kind) for every run the benchmark would start."""
    kind = {m.name: m.method for m in cfg.methods}
    grid = [("grid", name, point, kind[name]) for name, point in cfg.grid_jobs()]
    finals = [("final", name, None, kind[name]) for _, _, name in cfg.runs()]
    return grid + finals


def rungs(cfg: BenchConfig, full: int) -> list[int]:
    """The steps halving decides at: min_resource x reduction_factor^k below the full budget,
    each moved to the first periodic evaluation at or after it."""
    s, every = cfg.sweep, cfg.training.eval_every or 1
    out, k = [], 0
    while (step := (s.min_resource or every) * s.reduction_factor ** k) < full:
        at = math.ceil(step / every) * every
        if at < full and at not in out:
            out.append(at)
        k += 1
    return out


def _replay(order: list[int], full: int, at: list[int], eta: int, bootstrap: int) -> int:
    """Steps Optuna's SuccessiveHalvingPruner lets points in `order` (a rank each, higher is
    better, the same at every rung) train, one after another."""
    seen: list[list[int]] = [[] for _ in at]
    total = 0
    for rank in order:
        steps = full
        for i, step in enumerate(at):
            seen[i].append(rank)
            top = sorted(seen[i], reverse=True)
            if len(top) <= bootstrap or rank < top[max(len(top) // eta - 1, 0)]:
                steps = step
                break
        total += steps
    return total


def halving_budget(cfg: BenchConfig, n: int, full: int, orders: int = 2000) -> tuple[int, float, int]:
    """(at least, expected, at most) training steps of a halving sweep of n points of `full`
    steps each (see the module's docstring)."""
    import numpy as np

    at, s = rungs(cfg, full), cfg.sweep
    if n == 0:
        return 0, 0.0, 0
    low = _replay(list(range(n - 1, -1, -1)), full, at, s.reduction_factor, s.bootstrap_count)
    high = _replay(list(range(n)), full, at, s.reduction_factor, s.bootstrap_count)
    rng = np.random.default_rng(0)
    mean = sum(_replay(list(rng.permutation(n)), full, at, s.reduction_factor, s.bootstrap_count)
               for _ in range(orders)) / orders
    return low, mean, high


def halving_lines(cfg: BenchConfig, train_rows: int) -> list[str]:
    if cfg.sweep is None or cfg.sweep.strategy != "halving":
        return []
    s = cfg.sweep
    lines = [f"halving: the top 1/{s.reduction_factor} of the points that reached a rung go on "
             f"(bootstrap_count {s.bootstrap_count}); training steps of the grid runs:"]
    for m in cfg.methods:
        pts = [p for name, p in cfg.grid_jobs() if name == m.name]
        full = planned_steps(cfg, train_rows, pts[0] if pts else None)
        low, mean, high = halving_budget(cfg, len(pts), full)
        grid = len(pts) * full
        lines.append(f"  {m.name}: {len(pts)} points x {full} steps = {grid:,} as a grid; rungs at "
                     f"{rungs(cfg, full) or 'none (below the first rung)'}: at most {high:,}, at "
                     f"least {low:,}, about {mean:,.0f} expected ({mean / max(grid, 1):.0%} of "
                     f"the grid; points in random order, ranked alike at every rung)")
    return lines


def table(cfg: BenchConfig) -> Table:
    t = Table(title=f"plan: {cfg.name}")
    for col in ("method", "kind", "grid", "grid runs", "final runs"):
        t.add_column(col)
    seeds = len(cfg.training.run_seeds)
    for m in cfg.methods:
        grid = cfg.method_grid(m)
        shown = "; ".join(f"{k} ~ {next(iter(v))}{next(iter(v.values()))}" if isinstance(v, dict)
                          else f"{k} ∈ {v}" for k, v in grid.items()) or "(config values)"
        n = len([1 for name, _ in cfg.grid_jobs() if name == m.name])
        t.add_row(m.name, m.method, shown, str(n), str(seeds))
    return t


def estimate_lines(cfg: BenchConfig, train_rows: int, digest: str, workers: int) -> list[str]:
    est = history(cfg, digest)
    if not est:
        return ["time: no earlier run of this model and data in the MLflow experiment, so no "
                "estimate yet (run once, or `plan` after a first benchmark)"]
    waves: dict[str, list[float]] = {"grid": [], "final": []}
    missing = set()
    for phase, name, point, kind in jobs(cfg):
        e = est.get(kind)
        if e is None:
            missing.add(kind)
            continue
        waves[phase].append(planned_steps(cfg, train_rows, point) * e.per_step_s + e.eval_s)
    serial = sum(sum(w) for w in waves.values())
    parallel = sum(math.ceil(len(w) / workers) * (sum(w) / len(w)) for w in waves.values() if w)
    lines = [f"time (training + evaluation, from {sum(e.runs_seen for e in est.values())} earlier "
             f"runs): about {_dur(serial)} on one device, {_dur(parallel)} on {workers} workers"]
    if missing:
        lines.append(f"  no history for {sorted(missing)}: their runs are not in the estimate")
    return lines


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def describe(cfg: BenchConfig, train_rows: int, digest: str, workers: int) -> list:
    """What `plan` prints: the table, the counts and the estimate."""
    grid, finals = len(cfg.grid_jobs()), len(cfg.methods) * len(cfg.training.run_seeds)
    out: list = [table(cfg)]
    limit = f" (sweep.max_runs {cfg.sweep.max_runs})" if cfg.sweep else ""
    out.append(f"{grid} grid runs (first seed, scored on {cfg.data.eval_split}) + {finals} final "
               f"runs ({len(cfg.methods)} methods x {len(cfg.training.run_seeds)} seeds, scored on "
               f"{cfg.data.test_split or ('a share of train' if cfg.data.test_from_train else cfg.data.eval_split)})"
               f" = {grid + finals} runs{limit}")
    out += halving_lines(cfg, train_rows)
    out += estimate_lines(cfg, train_rows, digest, workers)
    return out
