"""A dataset's labels: integer class ids as given, or class names mapped to ids.

A label column holds either ids (1, "1", 1.0) or class names ("negative"), never both: a mix
means a broken export or the wrong column, so it is refused naming a row of each kind.

Names are stripped of surrounding whitespace (a stray space must not make a second class; ids
already allow it). The classes are the sorted distinct names of the *training* split (Python's
string order, case-sensitive), and a class's id is its position in that list: the same data
gives the same ids on every machine and whatever the order of its rows. `data.label_names`
fixes the list instead (its order, and classes absent from training); with integer labels it
names ids 0..n-1. The names travel with the data (`DataSummary.label_names`) to the model's
`id2label` and to MLflow.

Needs only pandas, like `tasks.data.dataset`: errors come before anything slow is imported.
"""
from __future__ import annotations

import json
import numbers
import re
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from tasks.config.schema import DataConfig

_INT = re.compile(r"\s*[+-]?\d+\s*")
Label = Union[int, str]  # an id, or a class name (stripped)


class DataError(ValueError):
    """Data that cannot be used; the message names the file or hub id, the column and the line.
    (Defined here, the lowest module of the data path, and imported from here everywhere.)"""


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def parse(value: Any, at: str) -> Label:
    """One label cell as an id or a class name; DataError for anything else. `at` says where
    ("<file>: line N: column 'label'"). Booleans and fractions are refused: they mean the
    wrong column, not a class."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{at}: label {value!r} is not an integer (a boolean: the wrong column?)")
    if isinstance(value, numbers.Integral):
        return int(value)
    if _is_null(value):
        raise DataError(f"{at}: label is empty (null)")
    if isinstance(value, str):
        if _INT.fullmatch(value):
            return int(value)
        if not value.strip():
            raise DataError(f"{at}: label is empty")
        try:
            float(value)  # "0.5", "1e3", "nan": a number that is no id, not a class name
        except ValueError:
            return value.strip()
        raise DataError(f"{at}: label {value!r} is not an integer")
    try:
        as_float = float(value)  # pandas writes integer columns holding nulls as floats
    except (TypeError, ValueError):
        raise DataError(f"{at}: label {value!r} is neither an integer nor a class name") from None
    if not as_float.is_integer():
        raise DataError(f"{at}: label {value!r} is not an integer")
    return int(as_float)


def _first_of_each_kind(frames: dict[str, pd.DataFrame]) -> dict[type, tuple[str, Any, Label]]:
    """{int or str: (role, position, label)} for the first row of each kind, in the order
    met (roles in order, rows in file order)."""
    first: dict[type, tuple[str, Any, Label]] = {}
    for role, frame in frames.items():
        for pos, label in zip(frame.index, frame["label"].tolist()):
            first.setdefault(type(label), (role, pos, label))
        if len(first) == 2:
            break
    return first


def _refuse_mixed(frames: dict[str, pd.DataFrame], where: dict[str, str], column: str) -> None:
    first = _first_of_each_kind(frames)
    if len(first) < 2:
        return
    # The kind met first sets the convention; the other kind's first row is the offender.
    (lead, (r0, p0, v0)), (_, (r1, p1, v1)) = first.items()
    first_at = f"{where[r0]}: {frames[r0].index.name} {p0}"
    said = (f"label {v1!r} is not an integer, but {first_at} has the integer label {v0}"
            if lead is int else
            f"label {v1} is an integer id, but {first_at} has the class name {v0!r}")
    raise DataError(f"{where[r1]}: {frames[r1].index.name} {p1}: column {column!r}: {said}; "
                    f"labels must be all integer ids or all class names")


def check_label_names(cfg: DataConfig) -> Optional[list[str]]:
    """`data.label_names`, stripped, or None; DataError for an empty, duplicate or numeric one."""
    if cfg.label_names is None:
        return None
    out: list[str] = []
    for i, raw in enumerate(cfg.label_names):
        name = parse(raw, f"data.label_names[{i}]")
        if isinstance(name, int):
            raise DataError(f"data.label_names[{i}]: {raw!r} is an integer; class names must "
                            "not be (integer labels are ids, named by position in this list)")
        if name in out:
            raise DataError(f"data.label_names: {name!r} is listed twice")
        out.append(name)
    if len(out) < 2:
        raise DataError(f"data.label_names: {out} has {len(out)} name; a classifier needs two")
    return out


def _classes(train: pd.DataFrame, fixed: Optional[list[str]]) -> list[str]:
    return fixed if fixed is not None else sorted(set(train["label"].tolist()))


def _to_ids(frame: pd.DataFrame, ids: dict[str, int], where: str, column: str,
            unknown: str) -> pd.DataFrame:
    labels = frame["label"].tolist()
    for pos, name in zip(frame.index, labels):
        if name not in ids:
            raise DataError(f"{where}: {frame.index.name} {pos}: column {column!r}: label "
                            f"{name!r} {unknown}")
    return frame.assign(label=[ids[n] for n in labels])


def resolve(frames: dict[str, pd.DataFrame], where: dict[str, str],
            cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], Optional[list[str]]]:
    """Every role's labels as ids (frames keyed by role, "train" first), and the class names
    by id: the training split's sorted names, `data.label_names`, or None for integer labels
    without it."""
    fixed = check_label_names(cfg)
    _refuse_mixed(frames, where, cfg.label_column)
    if not isinstance(frames["train"]["label"].iloc[0], str):  # one kind only, by now
        return {r: f.assign(label=f["label"].astype("int64")) for r, f in frames.items()}, fixed
    classes = _classes(frames["train"], fixed)
    ids = {name: i for i, name in enumerate(classes)}
    if fixed is not None:
        unknown = {r: f"is not in data.label_names {classes}" for r in frames}
    else:
        unknown = {r: f"is not a class of the training split {where['train']} (its classes: "
                      f"{classes}); list every class in data.label_names if it is one"
                   for r in frames}
    return {r: _to_ids(f, ids, where[r], cfg.label_column, unknown[r])
            for r, f in frames.items()}, classes


def names_tag(names: list[str], limit: int = 8000) -> str:
    """The class names as JSON for an MLflow tag (8,000 characters at most): all of them, or
    the first that fit and a count of the rest (the model's id2label holds every one)."""
    text = json.dumps(names, ensure_ascii=False)
    k = len(names)
    while len(text) > limit:
        k = k * 9 // 10
        text = json.dumps(names[:k] + [f"... and {len(names) - k} more"], ensure_ascii=False)
    return text


# ---------------------------------------------------------------- the number of classes


def num_labels(cfg: DataConfig, train: pd.DataFrame, where: str,
               names: Optional[list[str]]) -> tuple[int, str]:
    """(number of classes, why that number): the class names' count, else `data.num_labels`,
    else 1 + the largest label of the *training* split. Evaluation labels are checked against
    it, never used to infer it (one stray label 2 in the eval file would otherwise turn a
    binary task into a 3-class one)."""
    if names is not None:
        whose = ("data.label_names has" if cfg.label_names is not None
                 else f"the training split {where} has")
        if cfg.num_labels is not None and cfg.num_labels != len(names):
            raise DataError(f"data.num_labels = {cfg.num_labels}, but {whose} {len(names)} "
                            f"classes {names}; make them agree, or leave data.num_labels unset")
        return len(names), f"{whose} {len(names)} classes"
    if cfg.num_labels is not None:
        return cfg.num_labels, f"data.num_labels = {cfg.num_labels}"
    return (max(2, 1 + int(train["label"].max())),
            f"num_labels inferred from the training split {where}; set data.num_labels if the "
            f"task has more classes")


def check_range(frame: pd.DataFrame, where: str, column: str, num_labels: int, why: str) -> None:
    bad = frame[(frame["label"] < 0) | (frame["label"] >= num_labels)]
    if len(bad):
        raise DataError(f"{where}: {frame.index.name} {bad.index[0]}: column {column!r}: label "
                        f"{bad['label'].iloc[0]} is outside [0, {num_labels}) ({why})")


def check_classes(train: pd.DataFrame, where: str, cfg: DataConfig,
                  names: Optional[list[str]]) -> None:
    present = sorted(set(train["label"].tolist()))
    if len(present) < 2:
        picked = f" (the {len(train):,} rows picked by data.train_size)" if cfg.train_size else ""
        label = f"{present[0]} ({names[present[0]]!r})" if names else present[0]
        raise DataError(f"{where}: every training row{picked} has label {label}; a "
                        f"classifier needs at least two classes to learn from")


def check_hidden(frame: pd.DataFrame, where: str, role: str) -> None:
    """The hub's SST-2 (like GLUE) hides its test labels as -1: say what to do instead."""
    if len(frame) and (frame["label"] == -1).all():
        fix = ("set data.test_from_train: 0.1 to carve a labelled test split from the training "
               "data (seeded, disjoint from the training rows), or point data.test_split at "
               "labelled data" if role == "test" else "use a split with labels")
        raise DataError(f"{where}: every label is -1: the labels of this split are hidden; {fix}")
