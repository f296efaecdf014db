"""Hyper-parameter sweeps: each method at its own best settings, chosen on the selection split
and reported on a held-out test split.

A sweep is a grid per method: the benchmark-wide `sweep.grid`, with the method's own `sweep:`
winning key by key. Keys that do not apply to a method are left out for it (rank means nothing
to full fine-tuning). Every grid point trains under the first seed and is scored on the
selection split (`data.eval_split`); the best point per method, by `sweep.metric`, is then run
under every seed and scored on `data.test_split`, which selection never saw.

`sweep.strategy` says how the points are visited (flows/orchestration/trials.py runs them
through Optuna): `grid` trains every point to the end; `halving` trains the same points but
stops a point at a rung (`min_resource` x `reduction_factor`^k steps) when it is not in the
top 1/`reduction_factor` of the points that reached that rung (Optuna's
SuccessiveHalvingPruner, fed by the periodic evaluations); `tpe` samples `n_trials` points
from ranges (`lr: {log_uniform: [1.0e-5, 1.0e-2]}`) with Optuna's TPE sampler.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.common import names
from tasks.config.peft_block import PEFT_PREFIX

# Where each swept key lives: on the method (an adapter setting, or its lr) or in training.
METHOD_KEYS = ("lr", "rank", "alpha", "dropout", "targets", "rslora")
TRAINING_KEYS = ("weight_decay", "epochs", "max_steps")
SWEPT_KEYS = METHOD_KEYS + TRAINING_KEYS
ADAPTER_ONLY = ("rank", "alpha", "dropout", "targets", "rslora")
# The selection metric (a summary key) and whether higher is better.
METRICS = {names.ACCURACY: True, names.F1_MACRO: True, names.FINAL_LOSS: False}
# A range for `tpe`: {kind: [low, high]}, sampled uniformly, on the log scale, or as integers.
RANGES = ("uniform", "log_uniform", "int")

Grid = dict[str, Any]  # key -> a list of values, or (tpe only) a range {kind: [low, high]}
Point = dict[str, Any]


def is_range(values: Any) -> bool:
    return isinstance(values, dict)


def check_range(spec: dict, where: str) -> dict:
    if len(spec) != 1 or next(iter(spec)) not in RANGES:
        raise ValueError(f"{where}: a range is one of {{{', '.join(RANGES)}: [low, high]}}, "
                         f"not {spec}")
    kind, bounds = next(iter(spec.items()))
    ok = (isinstance(bounds, list) and len(bounds) == 2
          and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds))
    if not ok or not bounds[0] < bounds[1]:
        raise ValueError(f"{where}.{kind}: give [low, high] numbers with low < high, not {bounds}")
    if kind == "log_uniform" and bounds[0] <= 0:
        raise ValueError(f"{where}.log_uniform: low must be > 0 on a log scale, not {bounds[0]}")
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        raise ValueError(f"{where}.int: give whole numbers, not {bounds}")
    return spec


def is_peft_key(key: str) -> bool:
    """`peft.r`: a field of a method: peft's peft: block (checked when the point is applied)."""
    return key.startswith(PEFT_PREFIX) and len(key) > len(PEFT_PREFIX)


def grid_keys(grid: Grid) -> list[str]:
    """The grid's keys in a fixed order: ours, then the peft fields sorted."""
    return [k for k in SWEPT_KEYS if k in grid] + sorted(k for k in grid if is_peft_key(k))


def check_grid(grid: Grid, where: str) -> Grid:
    unknown = sorted(k for k in set(grid) - set(SWEPT_KEYS) if not is_peft_key(k))
    if unknown:
        raise ValueError(f"{where}: cannot sweep {unknown}; sweepable keys: {list(SWEPT_KEYS)} "
                         f"and, for method: peft, {PEFT_PREFIX}<field> (e.g. peft.r)")
    for key, values in grid.items():
        if is_range(values):
            check_range(values, f"{where}.{key}")
            continue
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key}: give a non-empty list of values"
                             " (or, for sweep.strategy: tpe, a range such as {log_uniform: [1.0e-5, 1.0e-2]})")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(seen)) != len(seen):
            raise ValueError(f"{where}.{key}: values repeat ({values})")
    return grid


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: Grid = Field(default_factory=dict, description="default grid for every method")
    metric: Literal[names.ACCURACY, names.F1_MACRO, names.FINAL_LOSS] = names.ACCURACY
    max_runs: int = Field(100, gt=0, description="refuse a sweep of more runs than this")
    reuse: bool = Field(True, description="reuse FINISHED runs of the same settings, data "
                                          "and code instead of training them again")
    strategy: Literal["grid", "halving", "tpe"] = Field(
        "grid", description="grid: every point to the end; halving: the grid's points, a point "
                            "stopped at a rung where it is not in the top 1/reduction_factor "
                            "(needs training.eval_every); tpe: n_trials points sampled from ranges")
    n_trials: Optional[int] = Field(None, gt=0, description="tpe: points sampled per method")
    seed: int = Field(0, description="the order halving visits the grid in; tpe's sampler seed")
    min_resource: Optional[int] = Field(
        None, gt=0, description="halving: steps before the first rung (default: training.eval_every)")
    reduction_factor: int = Field(3, ge=2, description="halving: the top 1/this go on at each rung")
    bootstrap_count: int = Field(
        0, ge=0, description="halving: points that must reach a rung before one may pass it "
                             "(the first ones are stopped there)")
    storage: Optional[str] = Field(
        None, description="halving/tpe: the Optuna studies: a database URL (sqlite:///..., "
                          "postgresql://...) or a journal file; default "
                          "<training.checkpoint_dir>/optuna.journal. Workers must share it")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        return check_grid(v, "sweep.grid")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def points(self, grid: Grid) -> list[Point]:
        """The runs of one method's grid: its points, or for tpe `n_trials` points to be
        sampled (empty here: their values are only known once sampled)."""
        return [{} for _ in range(self.n_trials or 0)] if self.strategy == "tpe" else points(grid)


def check_sweep(sweep: SweepConfig, eval_every: Optional[int], grids: dict[str, Grid],
                probe: Callable[[str, Point], Any]) -> None:
    """What only the whole config can tell: the strategy against training.eval_every, ranges
    against the strategy, and (tpe) each range's ends as values of their key."""
    if sweep.strategy == "halving" and not eval_every:
        raise ValueError("sweep.strategy: halving needs training.eval_every: the periodic "
                         "evaluations are the scores each rung compares")
    if sweep.strategy == "tpe" and sweep.n_trials is None:
        raise ValueError("sweep.n_trials: sweep.strategy: tpe needs it (the points it samples "
                         "per method)")
    if sweep.strategy != "tpe" and sweep.n_trials is not None:
        raise ValueError(f"sweep.n_trials: only for sweep.strategy: tpe ({sweep.strategy} runs "
                         "every point of the grid)")
    for name, grid in grids.items():
        for key, values in grid.items():
            if is_range(values) and sweep.strategy != "tpe":
                raise ValueError(f"sweep: {key}: {values} of {name} is a range; only "
                                 f"sweep.strategy: tpe samples ranges ({sweep.strategy} "
                                 "sweeps a list of values)")
        if sweep.strategy == "tpe":
            for corner in corners(grid):
                try:
                    probe(name, corner)
                except ValidationError as e:
                    err = e.errors()[0]
                    raise ValueError(f"sweep range end {corner} of {name}: {err['loc'][0]}: "
                                     f"{err['msg']}") from None


def corners(grid: Grid) -> list[Point]:
    """The lowest and the highest end of every range (and each listed value), for checking."""
    keys = grid_keys(grid)
    ends = {k: list(next(iter(grid[k].values()))) if is_range(grid[k]) else grid[k] for k in keys}
    return [{k: ends[k][min(i, len(ends[k]) - 1)] for k in keys}
            for i in range(max((len(v) for v in ends.values()), default=0))]


def method_grid(default: Grid, own: Optional[Grid], kind: str) -> Grid:
    """The method's own keys win; adapter-only keys are dropped for full fine-tuning and for
    method: peft (its settings are peft.X keys), peft.X keys for every other method."""
    grid = {**default, **(own or {})}
    if kind == "full":
        if own and (bad := sorted(set(own) & set(ADAPTER_ONLY))):
            raise ValueError(f"sweep: {bad} do not apply to full fine-tuning")
        grid = {k: v for k, v in grid.items() if k not in ADAPTER_ONLY}
    if kind == "peft":
        if own and (bad := sorted(set(own) & set(ADAPTER_ONLY))):
            raise ValueError(f"sweep: {bad} do nothing for method: peft; sweep its fields as "
                             f"{PEFT_PREFIX}<field> (e.g. peft.r)")
        grid = {k: v for k, v in grid.items() if k not in ADAPTER_ONLY}
    else:
        if own and (bad := sorted(k for k in own if is_peft_key(k))):
            raise ValueError(f"sweep: {bad} address a peft: block; only method: peft has one")
        grid = {k: v for k, v in grid.items() if not is_peft_key(k)}
    return grid


def points(grid: Grid) -> list[Point]:
    """The grid's cartesian product, keys in a fixed order; one empty point for no grid."""
    keys = grid_keys(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def label(point: Point) -> str:
    """A short, stable name for a point: `lr=0.0003,rank=8`."""
    if not point:
        return "default"
    return ",".join(f"{k}={_short(v)}" for k, v in point.items())


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def split_point(point: Point) -> tuple[Point, Point]:
    """(method fields, training fields) of a point."""
    return ({k: v for k, v in point.items() if k in METHOD_KEYS or is_peft_key(k)},
            {k: v for k, v in point.items() if k in TRAINING_KEYS})


def better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b
