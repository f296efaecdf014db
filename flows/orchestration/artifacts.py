"""A benchmark in Prefect's UI, beside the report's markdown artifact (tasks/report.py):

- a progress artifact, created at 0 % when the benchmark starts and updated each time one of
  its runs (a sweep's grid point or a (method, seed) final run) reaches a final state: runs
  done / total, the failures so far and an ETA in its description;
- a table artifact of the results when the benchmark concludes, one row per method, read back
  from MLflow through the summary the report is built from (tasks/analysis/aggregate.py).

Both are keyed per benchmark name (`artifact_key`), so Prefect's Artifacts page shows each
benchmark's history across nightly runs. Prefect keeps only the latest value of a progress
artifact; every update is also a `prefect.artifact.updated` event carrying its value and
description (Prefect's client emits it), which is where one run's progress history can be read.

An artifact is a view of the benchmark, not part of its result: one that cannot be written is
a warning in the flow run's log, never a failed benchmark.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError
from slugify import slugify

from flows.orchestration.jobs import Job
from tasks.analysis.aggregate import MethodAggregate, Summary, summarize
from tasks.common import names
from tasks.config.schema import TrackingConfig
from tasks.report import method_row
from tasks.reporting.render import verdict_rows
from tasks.tracking import runs as tracking

# Prefect's UI lists keys in one column: a long name is cut, and the hash keeps it apart.
SLUG_CHARS = 40
HASH_CHARS = 8
FAILED_NAMED = 5  # failed runs named in the progress description; the rest are counted

OnDone = Callable[[Job, str], None]  # a dispatch's hook: a job and its final state type


def artifact_key(prefix: str, benchmark: str) -> str:
    """`prefix` + the benchmark name's slug + 8 hex digits of the name's SHA-256: lowercase
    letters, digits and dashes only (Prefect's rule), the same for every run of one benchmark,
    and apart for two names that slugify alike ("CI nightly" and "ci-nightly")."""
    slug = slugify(benchmark, max_length=SLUG_CHARS) or "benchmark"
    digest = hashlib.sha256(benchmark.encode("utf-8")).hexdigest()[:HASH_CHARS]
    return f"{prefix}{slug}-{digest}"


def _warn(what: str, error: BaseException) -> None:
    message = (f"Prefect {what} artifact not written ({type(error).__name__}: {error}); "
               "the benchmark goes on without it")
    try:
        get_run_logger().warning(message)
    except MissingContextError:  # outside a flow run (a test, a script): plain logging
        logging.getLogger(__name__).warning(message)


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 07 min'."""
    s = max(0, round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, s = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


# ---------------------------------------------------------------- progress

@dataclass
class Progress:
    """A benchmark's runs done / total as a Prefect progress artifact. `finished` is the
    dispatch's hook (OnDone): one update per run that reaches a final state."""

    benchmark: str
    total: int
    artifact_id: Optional[UUID] = None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: list[str] = field(default_factory=list)  # the failed runs' keys, in order

    @classmethod
    def start(cls, benchmark: str, total: int) -> Progress:
        progress = cls(benchmark, max(total, 1))
        try:
            progress.artifact_id = create_progress_artifact(
                0.0, key=artifact_key(names.PREFECT_PROGRESS_PREFIX, benchmark),
                description=progress.description())
        except Exception as error:  # noqa: BLE001 - a view, never the benchmark's failure
            _warn("progress", error)
        return progress

    def finished(self, job: Job, state: str) -> None:
        self.done += 1
        if state != "COMPLETED":
            self.failed.append(job.key)
        if self.artifact_id is None:  # its creation failed and was reported then
            return
        try:
            update_progress_artifact(self.artifact_id, self.percent(),
                                     description=self.description(f"{job.key} {state}"))
        except Exception as error:  # noqa: BLE001 - as above
            _warn("progress", error)

    def percent(self) -> float:
        return 100.0 * min(self.done, self.total) / self.total

    def description(self, last: Optional[str] = None) -> str:
        """'ci: 3 of 8 runs done, 1 failed (lora/seed=2); ETA 2 min 10 s (1 min 05 s
        elapsed); last: dora/seed=1 COMPLETED'."""
        elapsed = time.monotonic() - self.started
        head = f"{self.benchmark}: {self.done} of {self.total} runs done"
        if self.failed:
            named = ", ".join(self.failed[:FAILED_NAMED])
            if len(self.failed) > FAILED_NAMED:
                named += f" and {len(self.failed) - FAILED_NAMED} more"
            head += f", {len(self.failed)} failed ({named})"
        if self.done >= self.total:
            when = f"finished in {duration(elapsed)}"
        elif self.done == 0:
            when = "ETA unknown"
        else:  # the mean time per finished run so far, for those still to come
            eta = elapsed / self.done * (self.total - self.done)
            when = f"ETA {duration(eta)} ({duration(elapsed)} elapsed)"
        return "; ".join([head, when] + ([f"last: {last}"] if last else []))


# ---------------------------------------------------------------- results table

def verdict(agg: MethodAggregate, summary: Summary, verdicts: dict[str, dict]) -> str:
    """The method against the reference, in the report's words (tasks/reporting/render.py)."""
    if agg.method == summary.reference:
        return "reference"
    if not agg.finished:
        return "did not finish"
    v = verdicts.get(agg.method)
    if v is None:
        return f"no comparison ({summary.reference} did not finish)"
    return f"{v['accuracy_diff']} vs {v['reference']}, {v['significance']}"


def _rounded(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def results_rows(summary: Summary) -> list[dict]:
    """One row per method, in the config's order, with the report's numbers (`method_row`:
    the mean over the finished seeds, computed as the report computes it) at the report's
    precision."""
    verdicts = {v["method"]: v for v in verdict_rows(summary.comparisons)}
    rows = []
    for agg in summary.methods.values():
        row = method_row(agg)
        ci = row[names.row_ci(names.ACCURACY)]
        rows.append({
            "method": agg.method, "kind": agg.kind,
            "seeds": f"{row[names.N_SEEDS]} of {len(agg.runs)}",
            "accuracy (mean)": _rounded(row[names.ACCURACY], 4),
            "accuracy 95% CI": "—" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]",
            "train time s": _rounded(row[names.TRAIN_TIME], 1),
            "peak memory MB": _rounded(row[names.PEAK_MEMORY], 0),
            "vs reference": verdict(agg, summary, verdicts)})
    return rows


def publish_results(benchmark: str, tracking_cfg: TrackingConfig,
                    parent_run_id: str) -> Optional[UUID]:
    """The results table of a concluded benchmark, from what MLflow holds; its id, or None
    (with a warning) when it could not be written."""
    try:
        client = tracking.client(tracking_cfg)
        summary = summarize(client, client.get_run(parent_run_id))
        return create_table_artifact(
            results_rows(summary), key=artifact_key(names.PREFECT_RESULTS_PREFIX, benchmark),
            description=f"peft-bench results of {benchmark} (MLflow parent run "
                        f"{parent_run_id}): per method, the report's means over the finished "
                        "seeds, accuracy's 95% interval over seeds, and the verdict against "
                        f"the reference {summary.reference} (accuracy difference paired by "
                        "seed, in points)")
    except Exception as error:  # noqa: BLE001 - a view, never the benchmark's failure
        _warn("results table", error)
        return None
