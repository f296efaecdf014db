"""Charts of a sweep's grid runs (every point, scored on the selection split).

- Sensitivity: the selection metric against the learning rate (log axis), one panel per method
  with more than one scored point and one line per value of the other swept keys, the chosen
  point starred; without an lr grid, against the method's first swept key.
- Grid Pareto: selection accuracy against trainable parameters, peak memory and training time,
  every point of every method in the method's colour, the chosen points starred, and the
  staircase of the best accuracy reachable within each budget.

Same conventions as `tasks/reporting/charts.py`: the object API on an Agg canvas (never pyplot), and
None when there is nothing to draw, so the caller can say so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, TypeVar

from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from tasks.analysis.aggregate import GridPoint
from tasks.common import names
from tasks.config.sweep import label as point_label
from tasks.reporting.charts import Chart, human, new_figure, save_figure, style_axes

Grids = dict[str, list[GridPoint]]
T = TypeVar("T")
STAR = {"marker": "*", "s": 260, "color": "#fab005", "edgecolors": "black", "linewidths": 1.0,
        "zorder": 5}
# (summary key, axis label, log scale) of the grid Pareto chart's panels
PARETO_AXES = ((names.TRAINABLE_PARAMS, "trainable parameters (log scale)", True),
               (names.PEAK_MEMORY, "peak memory (MB)", False),
               (names.TRAIN_TIME, "training time (s)", False))
PANELS_PER_ROW = 3


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def x_key(points: list[GridPoint]) -> Optional[str]:
    """The swept key to plot along x: lr when it was swept, else the first swept key."""
    keys = list(dict.fromkeys(k for g in points for k in g.point))
    if not keys:
        return None
    return "lr" if "lr" in keys else keys[0]


def _value_text(key: str, value) -> str:
    return point_label({key: value}).split("=", 1)[1]


def _lines(points: list[GridPoint], key: str) -> dict[str, list[GridPoint]]:
    """The points grouped by the values of the other swept keys ("" when there are none)."""
    out: dict[str, list[GridPoint]] = {}
    for g in points:
        rest = {k: v for k, v in g.point.items() if k != key}
        out.setdefault(point_label(rest) if rest else "", []).append(g)
    return out


def _sensitivity_panel(ax, method: str, points: list[GridPoint], metric: str, color: str) -> None:
    key = x_key(points)
    numeric = all(_number(g.point.get(key)) for g in points)
    order = list(dict.fromkeys(_value_text(key, g.point.get(key)) for g in points))

    def x(g: GridPoint):
        return g.point[key] if numeric else order.index(_value_text(key, g.point.get(key)))

    lines = _lines(points, key)
    shades = colormaps["viridis"]
    for i, (name, pts) in enumerate(lines.items()):
        pts = sorted(pts, key=x)
        shade = color if len(lines) == 1 else shades(i / max(1, len(lines) - 1) * 0.85)
        ax.plot([x(g) for g in pts], [g.metrics[metric] for g in pts], marker="o",
                color=shade, linewidth=1.5, markersize=5, label=name or None)
        for g in pts:
            if g.chosen:
                ax.scatter([x(g)], [g.metrics[metric]], **STAR)
    if numeric and key == "lr" and all(g.point[key] > 0 for g in points):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(order)), order)
    ax.set_title(method, loc="left", fontweight="bold")
    ax.set_xlabel(key + (" (log scale)" if ax.get_xscale() == "log" else ""))
    if len(lines) > 1:
        ax.legend(frameon=False, fontsize=8)
    style_axes(ax, "both")


def sensitivity_chart(grids: Grids, metric: str, split: Optional[str], colors,
                      path: Path) -> Optional[Path]:
    """One panel per method with more than one scored, swept point; None when no method has."""
    panels = {m: [g for g in pts if g.point and g.metrics.get(metric) is not None]
              for m, pts in grids.items()}
    panels = {m: pts for m, pts in panels.items() if len(pts) > 1}
    if not panels:
        return None
    cols = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(4.4 * cols + 0.4, 3.6 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).flat
    for (method, pts), ax in zip(panels.items(), axes):  # panels first: no axis is skipped
        _sensitivity_panel(ax, method, pts, metric, colors.get(method, "#4C72B0"))
        ax.set_ylabel(names.CHILD_METRICS[metric] + (f" on {split}" if split else ""))
    for ax in list(axes):  # the grid's unused cells
        ax.set_visible(False)
    fig.suptitle("Sensitivity: selection metric per grid point (★ = chosen)", x=0.01,
                 ha="left", fontweight="bold")
    return save_figure(fig, path)


def frontier(items: list[T], cost: Callable[[T], float],
             accuracy: Callable[[T], float]) -> list[T]:
    """The Pareto staircase: walking up the cost, each item more accurate than every item that
    costs no more (of equal costs, the more accurate)."""
    out: list[T] = []
    for item in sorted(items, key=lambda i: (cost(i), -accuracy(i))):
        if not out or accuracy(item) > accuracy(out[-1]):
            out.append(item)
    return out


def _pareto_panel(ax, grids: Grids, key: str, xlabel: str, log: bool, colors) -> bool:
    seen = []
    for method, pts in grids.items():
        pts = [g for g in pts if g.metrics.get(names.ACCURACY) is not None
               and g.metrics.get(key) is not None and (g.metrics[key] > 0 or not log)]
        seen += [(g.metrics[key], g.metrics[names.ACCURACY]) for g in pts]
        ax.scatter([g.metrics[key] for g in pts], [g.metrics[names.ACCURACY] for g in pts], s=40,
                   color=colors.get(method, "#4C72B0"), alpha=0.85, zorder=3)
        best = [g for g in pts if g.chosen]
        ax.scatter([g.metrics[key] for g in best], [g.metrics[names.ACCURACY] for g in best],
                   **{**STAR, "color": colors.get(method, "#4C72B0")})
    if not seen:
        ax.set_visible(False)
        return False
    stairs = frontier(seen, cost=lambda p: p[0], accuracy=lambda p: p[1])
    ax.step([c for c, _ in stairs], [a for _, a in stairs], where="post", color="#888888",
            linestyle="--", linewidth=1, zorder=2)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    ax.set_xlabel(xlabel)
    ax.margins(x=0.12, y=0.12)
    style_axes(ax, "both")
    return True


def grid_pareto_chart(grids: Grids, split: Optional[str], colors, path: Path) -> Optional[Path]:
    """Three panels, accuracy on the selection split against params, memory and time."""
    fig = new_figure(13.5, 4.3)
    axes = fig.subplots(1, len(PARETO_AXES), sharey=True)
    drawn = [_pareto_panel(ax, grids, key, xlabel, log, colors)
             for ax, (key, xlabel, log) in zip(axes, PARETO_AXES)]
    if not any(drawn):
        return None
    axes[0].set_ylabel(names.EVAL_ACCURACY + (f" on {split}" if split else ""))
    handles = [Line2D([], [], marker="o", linestyle="", color=colors.get(m, "#4C72B0"), label=m)
               for m in grids]
    handles += [Line2D([], [], marker="*", linestyle="", markersize=13, color="white",
                       markeredgecolor="black", label="chosen"),
                Line2D([], [], color="#888888", linestyle="--", label="best within budget")]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    fig.suptitle("Every grid point: accuracy against cost (★ = chosen)", x=0.01, ha="left",
                 fontweight="bold")
    return save_figure(fig, path)


def draw_sweep(grids: Grids, metric: str, split: Optional[str], colors,
               out: Path) -> tuple[list[Chart], list[str]]:
    """Both sweep charts into `out`; the charts drawn and a note for each one skipped."""
    if not grids:
        return [], []
    where = f" on the selection split ({split})" if split else " on the selection split"
    specs = [
        (names.CHART_SWEEP_SENSITIVITY, "Sweep sensitivity",
         f"{names.CHILD_METRICS[metric]}{where} at each grid point, against the learning rate "
         "(log scale; the first swept key when lr was not swept), one line per value of the "
         "other swept keys; ★ = the chosen point. One seed per point: small differences are "
         "within the noise.", lambda p: sensitivity_chart(grids, metric, split, colors, p),
         "no method has more than one finished grid point"),
        (names.CHART_SWEEP_PARETO, "Grid points: accuracy against cost",
         f"Accuracy{where} of every grid point against trainable parameters, peak memory and "
         "training time; ★ = each method's chosen point; the dashed staircase is the best "
         "accuracy reachable within each budget.",
         lambda p: grid_pareto_chart(grids, split, colors, p), "no grid point finished"),
    ]
    charts, notes = [], []
    for key, title, caption, draw, why in specs:
        path = draw(out / key)
        if path is None:
            notes.append(f"No {title.lower()} chart: {why}.")
        else:
            charts.append(Chart(key, title, path, caption))
    return charts, notes
