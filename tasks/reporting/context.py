"""What the report is made of: everything tasks/report.py read back from MLflow for one
benchmark, which the charts (tasks/reporting/charts*.py), summary.json and the two documents
(tasks/reporting/render.py) are drawn and written from. A dataclass, not a dict, so that a
field a writer forgets or a reader misspells fails where it happens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tasks.analysis.regression import Check
    from tasks.reporting.charts import Chart


@dataclass
class ReportContext:
    header: dict            # the parent run: ids, benchmark, model, data, seeds, splits, versions
    summary: list[dict]     # one row per method, keyed by names.SUMMARY_KEYS (report.method_row)
    finished: list[dict]    # the rows of the methods with at least one finished seed
    failures: list[dict]    # one per run that did not finish: method, kind, seed, run_id, error
    notes: list[str]
    budget: Optional[dict]  # the most accurate method within a memory or time budget
    sweep: Optional[dict]   # chosen points and every grid point; None without a sweep
    grids: dict             # method -> its GridPoints, for the sweep charts
    reused: list[dict]      # the final runs copied from an earlier identical run
    verdicts: list[dict]    # render.verdict_rows of the paired comparisons
    regressions: Optional[Check]
    timing_warnings: list[str]
    histories: dict         # method -> metric -> one [(step, value)] series per finished seed
    colors: dict            # method -> its colour in every chart
    charts: list[Chart] = field(default_factory=list)  # once drawn
