"""The benchmark report, read back from MLflow.

Everything in the report comes from the tracking store (never from the pipeline's memory), so
a report can be regenerated later, by anyone, from the parent run id alone. Per method it shows
the mean over seeds with a 95% interval, and a verdict against the reference method (paired by
seed, `tasks.aggregate`); the regression alarm's flags (`tasks.regression`) come first.
The report is built in a temp folder next to its destination and renamed into place at the
end, so a failure leaves either the previous report or nothing, never half a report.
"""
from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import names
from tasks.aggregate import MethodAggregate, Summary, summarize
from tasks.charts import Chart, draw_all, method_colors
from tasks.regression import Check
from tasks.report_render import render_html, render_markdown, verdict_rows
from tasks.stats import pareto_beyond_noise

HISTORY_METRICS = (names.TRAIN_LOSS, names.EVAL_ACCURACY)


class ReportError(RuntimeError):
    """The report cannot be built; the message names the run."""


@dataclass
class ReportResult:
    dir: Path
    markdown_path: Path
    html_path: Path
    summary: list[dict]
    charts: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- reading MLflow

def latest_parent_run(tracking_uri: str, experiment: str) -> Optional[str]:
    """The most recently started benchmark parent run in `experiment`, or None."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{names.ROLE}` = '{names.ROLE_PARENT}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Run]:
    """The parent's child runs (deleted ones left out), oldest first."""
    from tasks.aggregate import child_runs as _children

    client = MlflowClient(tracking_uri)
    return _children(client, get_parent(client, parent_run_id))


def get_parent(client: MlflowClient, run_id: str) -> Run:
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"cannot read parent run {run_id!r} from the tracking store "
                          f"{client.tracking_uri}: {e.message}") from e
    role = run.data.tags.get(names.ROLE)
    if role == names.ROLE_CHILD:
        raise ReportError(f"run {run_id!r} is a benchmark child run, not a parent; its parent "
                          f"is {run.data.tags.get(names.PARENT)!r}")
    if role == names.ROLE_AGGREGATE:
        raise ReportError(f"run {run_id!r} is a per-method aggregate run; its benchmark is "
                          f"{run.data.tags.get(names.BENCHMARK_RUN)!r}")
    return run


def _header(client: MlflowClient, parent: Run, tracking_uri: str, summary: Summary) -> dict:
    tags, params = parent.data.tags, parent.data.params
    exp = client.get_experiment(parent.info.experiment_id)
    started = datetime.fromtimestamp((parent.info.start_time or 0) / 1000, tz=timezone.utc)
    seeds = sorted({r.seed for m in summary.methods.values() for r in m.runs
                    if r.seed is not None})
    return {
        "benchmark": tags.get(names.BENCHMARK) or params.get("name") or parent.info.run_name,
        "parent_run_id": parent.info.run_id,
        "experiment": exp.name,
        "model": params.get("model.name_or_path", "unknown"),
        "dataset": params.get("data.source", "unknown"),
        "data_digest": tags.get(names.DATA_DIGEST, "unknown"),
        "device": tags.get(names.DEVICE, "unknown"),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": tags.get(names.GIT_SHA, "unknown"),
        "seeds": seeds,
        "reference": summary.reference,
        "versions": {k.removeprefix("versions."): v for k, v in sorted(params.items())
                     if k.startswith("versions.")},
        "random_init": tags.get(names.RANDOM_INIT, "").strip().lower() == "true",
        "ui_command": f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}",
        "params": {k: v for k, v in sorted(params.items()) if not k.startswith("versions.")},
    }


def _histories(client: MlflowClient, methods: list[MethodAggregate]) -> dict:
    """method -> metric -> one [(step, value)] series per finished seed."""
    out: dict = {}
    for m in methods:
        out[m.method] = {key: [] for key in HISTORY_METRICS}
        for run in m.finished:
            for key in HISTORY_METRICS:
                points = sorted(client.get_metric_history(run.run_id, key),
                                key=lambda p: (p.step, p.timestamp))
                out[m.method][key].append([(p.step, p.value) for p in points])
    return out


# ---------------------------------------------------------------- derived numbers

def method_row(agg: MethodAggregate) -> dict:
    """One method as the table, the charts and summary.json see it: means over finished seeds,
    with std and 95% interval bounds for the aggregated numbers."""
    row = {"method": agg.method, "kind": agg.kind, "status": agg.status,
           names.N_SEEDS: len(agg.finished), "seeds": [r.seed for r in agg.runs],
           "failed_seeds": [r.seed for r in agg.failures],
           "run_ids": [r.run_id for r in agg.runs],
           "error": "; ".join(f"seed {r.seed}: {r.error}" for r in agg.failures) or None,
           "timing_warnings": agg.timing_warnings}
    for key in names.CHILD_METRICS:
        iv = agg.stats.get(key)
        row[key] = None if iv is None else iv.mean
        if key in names.AGGREGATED:
            row[f"{key}_std"] = None if iv is None else iv.std
            row[f"{key}_ci"] = None if iv is None or not iv.has_interval else [iv.low, iv.high]
    for key in names.INTEGER_KEYS:
        if row[key] is not None and float(row[key]).is_integer():
            row[key] = int(row[key])
    return row


def _derive(rows: list[dict], summary: Summary, notes: list[str]) -> None:
    ref = next((r for r in rows if r["method"] == summary.reference and r["train_time_s"]), None)
    if ref is None:
        notes.append("The reference method has no training time: times are shown in absolute "
                     "seconds, not relative to it.")
    for r in rows:
        t = r["train_time_s"]
        r["train_time_pct_of_ref"] = (None if ref is None or t is None else
                                      100.0 if r is ref else 100 * t / ref["train_time_s"])
    # A method is starred when no other method is better on both axes beyond the intervals.
    # Methods with contaminated timings are not ranked on time at all.
    aggs = {m.method: m for m in summary.methods.values()}
    points = {r["method"]: (aggs[r["method"]].stats["train_time_s"],
                            aggs[r["method"]].stats["accuracy"]) for r in rows
              if r[names.N_SEEDS] and "train_time_s" in aggs[r["method"]].stats
              and "accuracy" in aggs[r["method"]].stats and not r["timing_warnings"]}
    best = pareto_beyond_noise(points)
    for r in rows:
        r["pareto_optimal"] = (r["method"] in best) if r["method"] in points else None


# ---------------------------------------------------------------- the report

def _context(client: MlflowClient, parent_run_id: str, tracking_uri: str) -> dict:
    parent = get_parent(client, parent_run_id)
    summary = summarize(client, parent)
    notes = list(summary.notes)
    if not summary.methods:
        notes.append("The parent run has no child runs: nothing to compare.")
    rows = [method_row(m) for m in summary.methods.values()]
    _derive(rows, summary, notes)
    failures = [{"method": m.method, "kind": m.kind, "seed": r.seed, "run_id": r.run_id,
                 "status": r.status, "error": r.error}
                for m in summary.methods.values() for r in m.failures]
    finished = [r for r in rows if r[names.N_SEEDS]]
    if failures:
        notes.append("Left out of the means and charts (did not finish): " + ", ".join(
            f"{f['method']} seed {f['seed']} ({f['status']})" for f in failures) + ".")
    return {"header": _header(client, parent, tracking_uri, summary), "summary": rows,
            "finished": finished, "failures": failures, "notes": notes,
            "verdicts": verdict_rows(summary.comparisons),
            "regressions": Check.from_json(parent.data.tags.get(names.REGRESSIONS)),
            "timing_warnings": [w for r in rows for w in r["timing_warnings"]],
            "histories": _histories(client, [m for m in summary.methods.values() if m.finished]),
            "colors": method_colors([r["method"] for r in rows]),
            "random_init_text": "The base model was randomly initialised (no pretrained weights "
            "were loaded), so these accuracies say nothing about pretrained models; use this run "
            "only to check that the pipeline works and to compare time and memory."}


def _write(ctx: dict, work: Path) -> list[Chart]:
    charts, chart_notes = draw_all(ctx["finished"], ctx["histories"], ctx["header"]["reference"],
                                   ctx["colors"], work)
    ctx["charts"], ctx["notes"] = charts, ctx["notes"] + chart_notes
    reg = ctx["regressions"]
    summary = {"parent_run_id": ctx["header"]["parent_run_id"],
               "benchmark": ctx["header"]["benchmark"], "seeds": ctx["header"]["seeds"],
               "random_init": ctx["header"]["random_init"],
               "reference": ctx["header"]["reference"],
               "chart_methods": [r["method"] for r in ctx["finished"]],
               "methods": ctx["summary"], "verdicts": ctx["verdicts"],
               "regressions": [f.message for f in reg.flags] if reg else None,
               "timing_warnings": ctx["timing_warnings"], "notes": ctx["notes"]}
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    (work / "summary.json").write_text(text, encoding="utf-8")
    (work / "report.md").write_text(render_markdown(ctx), encoding="utf-8")
    (work / "report.html").write_text(render_html(ctx), encoding="utf-8")
    return charts


def _move_into_place(work: Path, dest: Path) -> None:
    """Swap the finished folder in; an older report is only removed once the new one is there."""
    if not dest.exists():
        work.rename(dest)
        return
    old = work.with_name(work.name + ".old")
    dest.rename(old)
    try:
        work.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def generate_report(parent_run_id: str, tracking_uri: str, out_dir: Path) -> ReportResult:
    """Write report.md, report.html, charts and summary.json into out_dir/<parent_run_id>/ and
    log them to the parent run under `report/`."""
    client = MlflowClient(tracking_uri)
    ctx = _context(client, parent_run_id, tracking_uri)  # fails before anything is written
    run_id = ctx["header"]["parent_run_id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_id}.", suffix=".tmp", dir=out_dir))
    work.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    try:
        charts = _write(ctx, work)
        # Logged from the temp folder, before the rename, so a logging failure leaves no report.
        client.log_artifacts(run_id, str(work), artifact_path=names.REPORT_ARTIFACTS)
        dest = out_dir / run_id
        _move_into_place(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ReportResult(dir=dest, markdown_path=dest / "report.md", html_path=dest / "report.html",
                        summary=ctx["summary"], charts=[dest / c.path.name for c in charts])


@task(name="generate-report", cache_policy=NO_CACHE)
def generate_report_task(parent_run_id: str, tracking_uri: str, out_dir: Path,
                         artifact_key: str = names.PREFECT_REPORT_KEY) -> ReportResult:
    """Build the report and publish it (tables and notes; images stay in MLflow and the HTML)
    as a Prefect markdown artifact."""
    result = generate_report(parent_run_id, tracking_uri, out_dir)
    markdown = result.markdown_path.read_text(encoding="utf-8")
    # Relative image links would be broken in the Prefect UI, so point at the files instead.
    markdown = markdown.split("\n## Charts\n")[0] + (
        f"\n## Charts\n\nCharts and the full HTML report: `{result.html_path}` and the parent "
        f"run's `{names.REPORT_ARTIFACTS}/` artifacts in MLflow.\n")
    create_markdown_artifact(markdown=markdown, key=artifact_key,
                             description=f"peft-bench report for MLflow run {parent_run_id}")
    return result
