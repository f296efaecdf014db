"""Matplotlib charts for the benchmark report.

Every chart takes the per-method summary rows (only the methods that finished) and returns
one Figure, which `draw_all` writes as a PNG (and a test can read back: the data drawn, the
text boxes). Figures are built with the object API on an Agg canvas, never through pyplot, so
charts can be drawn from Prefect worker threads without a display and without pyplot's global
state (adjustText imports pyplot, but is handed our Axes, so pyplot's figures stay empty).
A chart function returns None when there is nothing to draw, so the caller can say so.

Error bars are the rows' 95% intervals as stored: for time and memory the log-scale interval
(tasks/analysis/stats.py `log_interval`), which never reaches 0 and is longer above the mean
than below. Point labels are moved apart by adjustText; when it cannot separate them, the
chart names the points in a legend instead, so no label ever lies on another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from adjustText import adjust_text
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatter

from tasks.common import names

Rows = list[dict]
# method -> metric -> one [(step, value)] series per seed
Histories = dict[str, dict[str, list[list[tuple[int, float]]]]]

DPI = 120
SIZE_COLORS = {"float model": "#4C72B0", "4-bit model": "#DD8452", "adapter only": "#55A868"}
QUANTIZED_KINDS = ("qlora", "qdora")


@dataclass
class Chart:
    key: str  # its file name in the report folder: one of names.CHART_*
    title: str
    path: Path
    caption: str = ""


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, fixed by its position, so a method looks the same in every chart."""
    cmap = colormaps["tab10"]
    return {m: _hex(cmap(i % 10)) for i, m in enumerate(methods)}


def _hex(rgba) -> str:
    return "#%02x%02x%02x" % tuple(int(255 * c) for c in rgba[:3])


def human(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def new_figure(width: float = 6.6, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax, grid_axis: str = "y") -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis=grid_axis, color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _with(rows: Rows, *keys: str) -> Rows:
    return [r for r in rows if all(r.get(k) is not None for k in keys)]


def _err(rows: Rows, key: str, scale: list[float] | None = None):
    """Asymmetric error bars from the rows' 95% intervals (`<key>_ci`); zero where absent.
    Matplotlib refuses a negative length, so a bound one rounding past its mean (seeds with
    equal values) draws as 0 rather than failing the whole report."""
    lo, hi = [], []
    for i, r in enumerate(rows):
        ci, mean, k = r.get(names.row_ci(key)), r.get(key), (scale[i] if scale else 1.0)
        lo.append(max(0.0, k * (mean - ci[0])) if ci else 0.0)
        hi.append(max(0.0, k * (ci[1] - mean)) if ci else 0.0)
    return [lo, hi] if any(lo) or any(hi) else None


def _barh(rows: Rows, values: list[float], labels: list[str], colors, title: str, xlabel: str,
          xerr=None):
    """Horizontal bars, first method on top, each bar labelled at its end; error bars are the
    95% intervals over seeds."""
    fig = new_figure(6.6, max(2.4, 0.55 * len(rows) + 1.3))
    ax = fig.add_subplot()
    methods = [r["method"] for r in rows]
    bars = ax.barh(methods, values, color=[colors[n] for n in methods], xerr=xerr,
                   error_kw={"ecolor": "#333333", "capsize": 3, "linewidth": 1})
    ax.invert_yaxis()
    ax.bar_label(bars, labels=labels, padding=4, fontsize=9)
    ax.set_title(title, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.margins(x=0.18)
    style_axes(ax, "x")
    return fig, ax


def time_chart(rows: Rows, reference: Optional[str], colors) -> Optional[Figure]:
    rows = _with(rows, names.TRAIN_TIME)
    if not rows:
        return None
    marks = [" ⚠" if r.get(names.TIMING_WARNINGS) else "" for r in rows]
    if reference is not None and all(r.get(names.PCT_OF_REF_TIME) is not None for r in rows):
        pct = [r[names.PCT_OF_REF_TIME] for r in rows]
        labels = [f"{p:.0f}%  ({r[names.TRAIN_TIME]:.1f} s){m}" for p, r, m in zip(pct, rows, marks)]
        scale = [p / r[names.TRAIN_TIME] for p, r in zip(pct, rows)]
        fig, ax = _barh(rows, pct, labels, colors, f"Training time relative to {reference}",
                        f"% of {reference}'s training time ({reference} = 100%)",
                        _err(rows, names.TRAIN_TIME, scale))
        ax.axvline(100, color="#444444", linestyle="--", linewidth=1)
    else:
        secs = [r[names.TRAIN_TIME] for r in rows]
        fig, ax = _barh(rows, secs, [f"{s:.1f} s{m}" for s, m in zip(secs, marks)], colors,
                        "Training time in seconds", "training time (s), geometric mean",
                        _err(rows, names.TRAIN_TIME))
    return fig


def size_chart(rows: Rows, colors) -> Optional[Figure]:
    """Model files and adapter-only files side by side; log scale because an adapter is
    hundreds of times smaller than the model it adapts."""
    rows = [r for r in rows if _positive(r.get(names.MODEL_SIZE)) or _positive(r.get(names.ADAPTER_SIZE))]
    if not rows:
        return None
    fig = new_figure(6.6, 4.4)
    ax = fig.add_subplot()
    width = 0.38
    for i, r in enumerate(rows):
        kind = "4-bit model" if r.get("kind") in QUANTIZED_KINDS else "float model"
        for offset, value, label in ((-width / 2, r.get(names.MODEL_SIZE), kind),
                                     (width / 2, r.get(names.ADAPTER_SIZE), "adapter only")):
            if _positive(value):
                bar = ax.bar(i + offset, value, width, color=SIZE_COLORS[label], label=label)
                ax.bar_label(bar, labels=[f"{value:.3g}"], padding=2, fontsize=8)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("size on disk (MB, log scale)")
    ax.set_title("Model size: float model, 4-bit model, adapter-only files", loc="left",
                 fontweight="bold")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per kind, not per bar
    order = [k for k in SIZE_COLORS if k in unique]
    ax.legend([unique[k] for k in order], order, frameon=False, loc="upper right")
    ax.margins(y=0.15)
    style_axes(ax)
    return fig


def _positive(v) -> bool:
    return v is not None and v > 0


def _curves(ax, rows: Rows, histories: Histories, metric: str, colors, marker=None) -> int:
    """One line per seed in the method's colour, labelled once."""
    drawn = 0
    for r in rows:
        series = [s for s in histories.get(r["method"], {}).get(metric) or [] if s]
        for i, points in enumerate(series):
            steps, values = zip(*points)
            ax.plot(steps, values, label=r["method"] if i == 0 else None,
                    color=colors[r["method"]], marker=marker, linewidth=1.4, markersize=3.5,
                    alpha=1.0 if len(series) == 1 else 0.75)
        drawn += bool(series)
    return drawn


def loss_chart(rows: Rows, histories: Histories, colors) -> Optional[Figure]:
    fig = new_figure()
    ax = fig.add_subplot()
    if not _curves(ax, rows, histories, names.TRAIN_LOSS, colors):
        return None
    ax.set_title("Training loss", loc="left", fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(names.TRAIN_LOSS)
    ax.legend(frameon=False)
    style_axes(ax, "both")
    return fig


def accuracy_chart(rows: Rows, histories: Histories, colors) -> Optional[Figure]:
    final = _with(rows, names.ACCURACY)
    if not final:
        return None
    fig = new_figure(10.0, 4.2)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    _curves(left, final, histories, names.EVAL_ACCURACY, colors, marker="o")
    left.set_title("Eval accuracy during training (one line per seed)", loc="left",
                   fontweight="bold")
    left.set_xlabel("optimizer step")
    left.set_ylabel(names.EVAL_ACCURACY)
    left.legend(frameon=False, fontsize=8)
    style_axes(left, "both")
    methods = [r["method"] for r in final]
    bars = right.bar(methods, [r[names.ACCURACY] for r in final], color=[colors[n] for n in methods],
                     yerr=_err(final, names.ACCURACY), error_kw={"ecolor": "#333333", "capsize": 3})
    right.bar_label(bars, labels=[f"{r[names.ACCURACY]:.3f}" for r in final], padding=2, fontsize=8)
    right.set_ylim(0, 1.08)
    right.set_title("Final accuracy (mean, 95% CI)", loc="left", fontweight="bold")
    right.tick_params(axis="x", labelrotation=30)
    style_axes(right)
    return fig


def memory_chart(rows: Rows, colors) -> Optional[Figure]:
    rows = _with(rows, names.PEAK_MEMORY)
    if not rows:
        return None
    values = [r[names.PEAK_MEMORY] for r in rows]
    fig, _ = _barh(rows, values, [f"{v:,.0f} MB" for v in values], colors,
                   "Peak memory during training", "peak memory (MB), geometric mean",
                   _err(rows, names.PEAK_MEMORY))
    return fig


def params_chart(rows: Rows, colors) -> Optional[Figure]:
    rows = [r for r in rows if _positive(r.get(names.TRAINABLE_PARAMS))]
    if not rows:
        return None
    values = [r[names.TRAINABLE_PARAMS] for r in rows]
    labels = [f"{human(v)}" + (f"  ({r[names.TRAINABLE_PCT]:.3g}%)" if r.get(names.TRAINABLE_PCT)
                               is not None else "") for v, r in zip(values, rows)]
    fig, ax = _barh(rows, values, labels, colors, "Trainable parameters (share of all parameters)",
                    "trainable parameters (log scale)")
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 3, max(values) * 12)  # room for the labels on a log axis
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    return fig


LABEL_ITERATIONS = 400  # adjustText's default stops after 1 s of wall time: machine-dependent
ARROW = {"arrowstyle": "-", "color": "#888888", "lw": 0.8}
EXPAND = (1.15, 1.4)  # the room adjustText keeps around a label: a margin, not a touch


def overlapping(texts, renderer) -> bool:
    """Whether any two of the texts' boxes, as drawn, share a pixel."""
    boxes = [t.get_window_extent(renderer) for t in texts]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def label_points(ax, points: list[tuple[float, float, str]], markers, handles: list) -> list:
    """One text label per point, moved apart by adjustText, which also keeps them off the
    `markers` (one scatter collection) and joins a moved label to its point with a thin line.
    If labels still overlap after that, they are removed and `handles` (one legend entry per
    point) name the points instead. Returns the labels kept."""
    fig = ax.get_figure()
    fig.canvas.draw()  # let the constrained layout size the axes, then freeze it: labels are
    fig.set_layout_engine("none")  # placed in pixels, and a later relayout would move them
    texts = [ax.text(x, y, label, fontsize=9, zorder=4) for x, y, label in points]
    renderer, arrows = fig.canvas.get_renderer(), []
    # A label wider than the axes fits nowhere (adjustText would warn at every iteration).
    if max(t.get_window_extent(renderer).width for t in texts) < ax.bbox.width:
        _, arrows = adjust_text(texts, x=[x for x, _, _ in points], y=[y for _, y, _ in points],
                                objects=markers, ax=ax, iter_lim=LABEL_ITERATIONS,
                                expand=EXPAND, arrowprops=ARROW)
        fig.canvas.draw()
        if not overlapping(texts, renderer):
            return texts
    for artist in [*texts, *arrows]:
        artist.remove()
    ax.legend(handles=handles, frameon=False, fontsize=9, loc="best")
    return []


def pareto_chart(rows: Rows, colors) -> Optional[Figure]:
    """Accuracy vs training time with 95% intervals as error bars (time: geometric mean and
    its log-scale interval); starred methods are those no other method beats on both axes
    beyond the intervals (hollow: not ranked on time)."""
    rows = _with(rows, names.TRAIN_TIME, names.ACCURACY)
    if not rows:
        return None
    fig = new_figure(6.6, 4.4)
    ax = fig.add_subplot()
    points, style, handles = [], [], []
    for r in rows:
        best, color = bool(r.get(names.PARETO_OPTIMAL)), colors[r["method"]]
        x, y = r[names.TRAIN_TIME], r[names.ACCURACY]
        xerr, yerr = _err([r], names.TRAIN_TIME), _err([r], names.ACCURACY)
        if xerr or yerr:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=color,
                        elinewidth=1.2, capsize=3, zorder=2)
        style.append((110, color, "black") if best else (60, "white", color))
        label = r["method"] + (" ★" if best else (" ⚠" if r.get(names.TIMING_WARNINGS) else ""))
        points.append((x, y, label))
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=8 if best else 6.5,
                              markerfacecolor=style[-1][1], markeredgecolor=style[-1][2],
                              label=label))
    # One collection for every marker: adjustText keeps the labels off it as a whole.
    markers = ax.scatter([p[0] for p in points], [p[1] for p in points],
                         s=[s for s, _, _ in style], c=[f for _, f, _ in style],
                         edgecolors=[e for _, _, e in style], linewidths=1.5, zorder=3)
    ax.set_title("Accuracy vs training time (★ = best beyond the 95% intervals)", loc="left",
                 fontweight="bold")
    # Log time axis: methods differ by factors (full vs an adapter), and the interval, symmetric
    # on the log scale, is drawn symmetric around its geometric mean; a linear axis let one
    # noisy method's upper end squash every other point into a corner.
    times = {p[0] for p in points}
    if len(times) == 1 and not any(_err([r], names.TRAIN_TIME) for r in rows):
        ax.set_xlim(min(times) / 1.5, max(times) * 1.5)  # one time: a log axis has no width
    ax.set_xscale("log")
    for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False))  # "20", not "2×10¹"
    ax.set_xlabel("training time (s, log scale), geometric mean over seeds")
    ax.set_ylabel("final eval/accuracy, mean over seeds")
    ax.margins(x=0.2, y=0.2)
    style_axes(ax, "both")
    label_points(ax, points, markers, handles)
    return fig


INTERVAL_SCALES = ("Accuracy: mean with its 95% t-interval; time and memory: geometric mean "
                   "with its 95% interval on the log scale, never below 0 and longer above the "
                   "mean than below.")


def draw_all(rows: Rows, histories: Histories, reference: Optional[str], colors,
             out: Path) -> tuple[list[Chart], list[str]]:
    """Draw every chart into `out`; return the charts drawn and a note for each one skipped."""
    no_baseline = "" if reference else " No reference method time, so absolute seconds."
    log_iv = ("geometric mean over seeds with its 95% interval on the log scale (never below 0, "
              "longer above the mean than below)")
    specs: list[tuple[str, str, str, Callable[[], Optional[Figure]]]] = [
        (names.CHART_PARETO, "Accuracy vs time", f"{INTERVAL_SCALES} Filled points are starred: "
         "no other method is faster and more accurate beyond the intervals.",
         lambda: pareto_chart(rows, colors)),
        (names.CHART_TRAIN_TIME, "Training time", "Wall-clock training time per method, "
         f"{log_iv}." + no_baseline, lambda: time_chart(rows, reference, colors)),
        (names.CHART_EVAL_ACCURACY, "Evaluation accuracy", "eval/accuracy on each run's scoring "
         "split (the test split for a sweep's final runs) at each evaluation, and the final "
         "value.", lambda: accuracy_chart(rows, histories, colors)),
        (names.CHART_TRAIN_LOSS, "Training loss", "train/loss per optimizer step.",
         lambda: loss_chart(rows, histories, colors)),
        (names.CHART_MODEL_SIZE, "Model size", "Size of the files written: the whole model (float "
         "or 4-bit) and the adapter-only files.", lambda: size_chart(rows, colors)),
        (names.CHART_PEAK_MEMORY, "Peak memory", f"Peak memory while training, {log_iv}.",
         lambda: memory_chart(rows, colors)),
        (names.CHART_TRAINABLE_PARAMS, "Trainable parameters", "Trainable parameters (log scale) "
         "and their share of all parameters.", lambda: params_chart(rows, colors)),
    ]
    charts, notes = [], []
    for key, title, caption, draw in specs:
        fig = draw()
        if fig is None:
            notes.append(f"No {title.lower()} chart: no finished method logged the data for it.")
        else:
            charts.append(Chart(key, title, save_figure(fig, out / key), caption))
    return charts, notes


def finite(v) -> Optional[float]:
    """MLflow can hold NaN/inf; the report shows those as missing rather than plotting them."""
    return None if v is None or not math.isfinite(v) else v
