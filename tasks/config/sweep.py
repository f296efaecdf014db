"""Hyper-parameter sweeps: each method at its own best settings, chosen on the selection split
and reported on a held-out test split.

A sweep is a grid per method: the benchmark-wide `sweep.grid`, with the method's own `sweep:`
winning key by key. Keys that do not apply to a method are left out for it (rank means nothing
to full fine-tuning). Every grid point trains under the first seed and is scored on the
selection split (`data.eval_split`); the best point per method, by `sweep.metric`, is then run
under every seed and scored on `data.test_split`, which selection never saw.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.common import names

# Where each swept key lives: on the method (an adapter setting, or its lr) or in training.
METHOD_KEYS = ("lr", "rank", "alpha", "dropout", "targets", "rslora")
TRAINING_KEYS = ("weight_decay", "epochs", "max_steps")
SWEPT_KEYS = METHOD_KEYS + TRAINING_KEYS
ADAPTER_ONLY = ("rank", "alpha", "dropout", "targets", "rslora")
# The selection metric (a summary key) and whether higher is better.
METRICS = {names.ACCURACY: True, names.F1_MACRO: True, names.FINAL_LOSS: False}

Grid = dict[str, list[Any]]
Point = dict[str, Any]


def check_grid(grid: Grid, where: str) -> Grid:
    unknown = sorted(set(grid) - set(SWEPT_KEYS))
    if unknown:
        raise ValueError(f"{where}: cannot sweep {unknown}; sweepable keys: {list(SWEPT_KEYS)}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key}: give a non-empty list of values")
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

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        return check_grid(v, "sweep.grid")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]


def method_grid(default: Grid, own: Optional[Grid], kind: str) -> Grid:
    """The method's own keys win; adapter-only keys are dropped for full fine-tuning."""
    grid = {**default, **(own or {})}
    if kind == "full":
        if own and (bad := sorted(set(own) & set(ADAPTER_ONLY))):
            raise ValueError(f"sweep: {bad} do not apply to full fine-tuning")
        grid = {k: v for k, v in grid.items() if k not in ADAPTER_ONLY}
    return grid


def points(grid: Grid) -> list[Point]:
    """The grid's cartesian product, keys in a fixed order; one empty point for no grid."""
    keys = [k for k in SWEPT_KEYS if k in grid]
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
    return ({k: v for k, v in point.items() if k in METHOD_KEYS},
            {k: v for k, v in point.items() if k in TRAINING_KEYS})


def better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b
