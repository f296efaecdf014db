"""What the CLI prints: a benchmark's methods (means over seeds with 95% intervals), the
verdicts against the reference method and the regression flags, read back from MLflow."""
from __future__ import annotations

from typing import Optional

from rich.table import Table

from tasks.analysis import stats
from tasks.analysis.aggregate import Summary
from tasks.analysis.regression import Check
from tasks.common import names
from tasks.reporting.render import verdict_rows

# (header, summary key, format, with its interval)
COLUMNS = [("accuracy", names.ACCURACY, "{:.4f}", True), ("f1", names.F1_MACRO, "{:.4f}", True),
           ("train s", names.TRAIN_TIME, "{:.1f}", True),
           ("step ms", names.STEP_TIME_MEDIAN, None, True),
           ("samples/s", names.SAMPLES_PER_S, "{:.1f}", True),
           ("peak MB", names.PEAK_MEMORY, "{:.0f}", True),
           ("trainable", names.TRAINABLE_PARAMS, "{:,.0f}", False),
           ("trainable %", names.TRAINABLE_PCT, "{:.3f}", False),
           ("model MB", names.MODEL_SIZE, "{:.2f}", False),
           ("adapter MB", names.ADAPTER_SIZE, "{:.3f}", False)]
TIMING = (names.TRAIN_TIME, names.STEP_TIME_MEDIAN, names.SAMPLES_PER_S)  # marked when contaminated


def _cell(summary_agg, key: str, fmt: Optional[str], with_ci: bool) -> str:
    iv = summary_agg.stats.get(key)
    if iv is None:
        return "-"
    f = (lambda v: f"{1000 * v:.1f}") if fmt is None else fmt.format
    text = f(iv.mean)
    if with_ci and iv.has_interval:  # a log-scale interval is not symmetric: show its ends
        text += (f" [{f(iv.low)}, {f(iv.high)}]" if iv.scale == stats.LOG
                 else " ± " + f((iv.high - iv.low) / 2))
    if key in TIMING and summary_agg.timing_warnings:
        text += " ⚠"
    return text


def methods_table(summary: Summary) -> Table:
    parent = summary.parent
    title = (f"benchmark {parent.data.tags.get(names.BENCHMARK, '')} "
             f"({parent.info.run_id}): over seeds, accuracy mean ± 95% CI; time, memory and "
             "throughput geometric mean [95% CI, log scale]")
    table = Table(title=title)
    for col in ["method", "kind", "status", "seeds", *[c[0] for c in COLUMNS]]:
        table.add_column(col, justify="left" if col in ("method", "kind", "status") else "right")
    for agg in summary.methods.values():
        table.add_row(agg.method, agg.kind, agg.status, f"{len(agg.finished)}/{len(agg.runs)}",
                      *[_cell(agg, key, fmt, ci) for _, key, fmt, ci in COLUMNS])
    return table


def verdicts_table(summary: Summary) -> Optional[Table]:
    rows = verdict_rows(summary.comparisons)
    if not rows:
        return None
    ref = summary.reference
    table = Table(title=f"verdicts against {ref} (paired by seed)")
    for col in ("method", f"Δ accuracy vs {ref}", "verdict", "McNemar per seed",
                f"time vs {ref}", f"memory vs {ref}"):
        table.add_column(col)
    for v in rows:
        table.add_row(v["method"], v["accuracy_diff"], v["significance"], v["mcnemar"],
                      v["time"], v["memory"])
    return table


def regression_lines(check: Optional[Check], against: str) -> list[str]:
    if check is None:
        return []
    if not check.baselines:
        return [f"regressions: nothing to compare with ({against})"]
    if not check.flags:
        return [f"regressions: none against {len(check.baselines)} {against}"]
    return ["[red]REGRESSION[/red] " + f.message for f in check.flags] + [
        f"  ({n})" for n in check.notes]
