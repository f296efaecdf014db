"""The benchmark report, read back from MLflow.

Everything in the report comes from the tracking store (never from the pipeline's memory),
so a report can be regenerated later, by anyone, from the parent run id alone. The report is
built in a temp folder next to its destination and renamed into place at the end, so a failure
leaves either the previous report or nothing, never half a report.
"""
from __future__ import annotations

import base64
import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from jinja2 import Environment, FileSystemLoader, select_autoescape
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.charts import Chart, draw_all, finite, human, method_colors, pareto_optimal

ROLE_TAG, METHOD_TAG, KIND_TAG = "peft_bench.role", "peft_bench.method", "peft_bench.method_kind"
ERROR_TAG, RANDOM_INIT_TAG = "peft_bench.error", "peft_bench.random_init"
PARENT_TAG = "mlflow.parentRunId"
ARTIFACT_PATH = "report"
PREFECT_ARTIFACT_KEY = "peft-bench-report"
TEMPLATES = Path(__file__).parent / "templates"

# summary key -> MLflow metric key. For histories (eval/*) MLflow's stored value is the one
# logged at the largest step, i.e. the final evaluation.
SUMMARY_METRICS = {
    "accuracy": "eval/accuracy", "f1_macro": "eval/f1_macro", "eval_loss": "eval/loss",
    "precision": "eval/precision", "recall": "eval/recall",
    "train_time_s": "train_time_s", "eval_time_s": "eval_time_s",
    "samples_per_s": "samples_per_s", "tokens_per_s": "tokens_per_s",
    "eval_samples_per_s": "eval_samples_per_s", "peak_memory_mb": "peak_memory_mb",
    "trainable_params": "trainable_params", "total_params": "total_params",
    "trainable_pct": "trainable_pct", "model_size_mb": "model_size_mb",
    "adapter_size_mb": "adapter_size_mb", "train_steps": "train_steps",
}
HISTORY_METRICS = ("train/loss", "eval/accuracy")

# (summary key, column header, format) for the table shared by report.md and report.html.
COLUMNS = [
    ("accuracy", "Accuracy", "{:.4f}"), ("f1_macro", "F1 (macro)", "{:.4f}"),
    ("eval_loss", "Eval loss", "{:.4f}"), ("train_time_s", "Train time (s)", "{:,.1f}"),
    ("train_time_pct_of_full", "% of full", "{:.1f}%"), ("samples_per_s", "Samples/s", "{:,.1f}"),
    ("tokens_per_s", "Tokens/s", "{:,.0f}"), ("peak_memory_mb", "Peak mem (MB)", "{:,.0f}"),
    ("trainable_params", "Trainable params", human), ("trainable_pct", "Trainable %", "{:.3g}%"),
    ("model_size_mb", "Model size (MB)", "{:,.1f}"), ("adapter_size_mb", "Adapter (MB)", "{:,.2f}"),
]


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
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Run]:
    """The parent's child runs (deleted ones left out), oldest first."""
    client = MlflowClient(tracking_uri)
    parent = _get_run(client, parent_run_id)
    runs, token = [], None
    while True:  # paged: a long sweep can exceed one page
        page = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                  ViewType.ACTIVE_ONLY, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"cannot read parent run {run_id!r} from the tracking store "
                          f"{client.tracking_uri}: {e.message}") from e


def _header(client: MlflowClient, parent: Run, tracking_uri: str) -> dict:
    tags, params = parent.data.tags, parent.data.params
    exp = client.get_experiment(parent.info.experiment_id)
    started = datetime.fromtimestamp((parent.info.start_time or 0) / 1000, tz=timezone.utc)
    return {
        "benchmark": tags.get("peft_bench.benchmark") or params.get("name") or parent.info.run_name,
        "parent_run_id": parent.info.run_id,
        "experiment": exp.name,
        "model": params.get("model.name_or_path", "unknown"),
        "dataset": params.get("data.source", "unknown"),
        "data_digest": tags.get("peft_bench.data_digest", "unknown"),
        "device": tags.get("peft_bench.device", "unknown"),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": tags.get("peft_bench.git_sha", "unknown"),
        "versions": {k.removeprefix("versions."): v for k, v in sorted(params.items())
                     if k.startswith("versions.")},
        "random_init": tags.get(RANDOM_INIT_TAG, "").strip().lower() == "true",
        "ui_command": f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}",
        "params": {k: v for k, v in sorted(params.items()) if not k.startswith("versions.")},
    }


def _method_row(run: Run) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    finished = run.info.status == "FINISHED"
    row = {
        "method": tags.get(METHOD_TAG) or run.info.run_name or run.info.run_id,
        "kind": tags.get(KIND_TAG, "unknown"),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "error": tags.get(ERROR_TAG) or (None if finished else "the run did not finish"),
    }
    # A run that did not finish has no result to compare; partial numbers would mislead.
    for key, metric in SUMMARY_METRICS.items():
        row[key] = finite(metrics.get(metric)) if finished else None
    for key in ("trainable_params", "total_params", "train_steps"):
        if row[key] is not None and float(row[key]).is_integer():
            row[key] = int(row[key])
    return row


def _latest_per_method(children: list[Run], notes: list[str]) -> list[Run]:
    """A retried method leaves several child runs; the latest one stands for the method."""
    by_method: dict[str, list[Run]] = {}
    for run in children:
        by_method.setdefault(run.data.tags.get(METHOD_TAG) or run.info.run_id, []).append(run)
    for name, runs in by_method.items():
        if len(runs) > 1:
            notes.append(f"Method {name} has {len(runs)} child runs; the latest "
                         f"({runs[-1].info.run_id}) is reported.")
    return [runs[-1] for runs in by_method.values()]


def _histories(client: MlflowClient, rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        out[row["method"]] = {
            key: [(m.step, m.value) for m in sorted(client.get_metric_history(row["run_id"], key),
                                                    key=lambda m: (m.step, m.timestamp))]
            for key in HISTORY_METRICS
        }
    return out


# ---------------------------------------------------------------- derived numbers

def _baseline(rows: list[dict]) -> Optional[dict]:
    """The full fine-tuning run that other times are relative to (a method named "full"
    first, else the first of kind full), if one finished with a training time."""
    fulls = [r for r in rows if r["kind"] == "full" and r["status"] == "FINISHED"
             and r["train_time_s"]]
    fulls.sort(key=lambda r: r["method"] != "full")
    return fulls[0] if fulls else None


def _derive(rows: list[dict], notes: list[str]) -> Optional[str]:
    base = _baseline(rows)
    if base is None:
        notes.append("No successful full fine-tuning run: training times are shown in absolute "
                     "seconds, not relative to full fine-tuning.")
    for r in rows:
        t = r["train_time_s"]
        if base is None or t is None:
            r["train_time_pct_of_full"] = None
        else:  # the baseline is 100 by definition; (100*t)/t need not round back to 100
            r["train_time_pct_of_full"] = 100.0 if r is base else 100 * t / base["train_time_s"]
    points = {r["method"]: (r["train_time_s"], r["accuracy"]) for r in rows
              if r["status"] == "FINISHED" and r["train_time_s"] is not None
              and r["accuracy"] is not None}
    best = pareto_optimal(points)
    for r in rows:
        r["pareto_optimal"] = (r["method"] in best) if r["method"] in points else None
    return base["method"] if base else None


# ---------------------------------------------------------------- rendering

def _cell(value, fmt) -> str:
    if value is None:
        return "—"
    return fmt(value) if callable(fmt) else fmt.format(value)


def table_rows(summary: list[dict]) -> list[dict]:
    """The table as strings, shared by the Markdown and the HTML so they cannot disagree."""
    out = []
    for r in summary:
        cells = [_cell(r.get(key), fmt) for key, _, fmt in COLUMNS]
        out.append({"method": r["method"], "kind": r["kind"], "status": r["status"],
                    "error": r["error"] if r["status"] != "FINISHED" else None,
                    "pareto": bool(r.get("pareto_optimal")), "cells": cells})
    return out


def _md_escape(text: str, limit: int = 0) -> str:
    text = " ".join(str(text).split())  # a newline would end the table row
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _md_table(summary: list[dict]) -> list[str]:
    heads = ["Method", "Kind", "Status"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * 3 + "---:|" * len(COLUMNS)]
    for t in table_rows(summary):
        status = t["status"] if not t["error"] else f"**{t['status']}**: {_md_escape(t['error'], 160)}"
        name = _md_escape(t["method"]) + (" ★" if t["pareto"] else "")
        lines.append("| " + " | ".join([name, t["kind"], status] + t["cells"]) + " |")
    return lines


def render_markdown(ctx: dict, with_charts: bool = True) -> str:
    h = ctx["header"]
    lines = [f"# peft-bench report: {h['benchmark']}", ""]
    if h["random_init"]:
        lines += [f"> **Warning:** {ctx['random_init_text']}", ""]
    lines += [f"- **Parent run:** `{h['parent_run_id']}` (experiment `{h['experiment']}`)",
              f"- **Model:** `{h['model']}`",
              f"- **Dataset:** `{h['dataset']}` (data digest `{h['data_digest']}`)",
              f"- **Device:** {h['device']}", f"- **Date:** {h['date']}",
              f"- **Git SHA:** `{h['git_sha']}`",
              "- **Versions:** " + (", ".join(f"{k} {v}" for k, v in h["versions"].items()) or "unknown"),
              f"- **Browse the runs:** `{h['ui_command']}`", "", "## Results", ""]
    lines += _md_table(ctx["summary"])
    lines += ["", "★ = Pareto-optimal in accuracy vs training time. Failed methods are left out "
              "of the charts.", ""]
    if ctx["notes"]:
        lines += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in ctx["notes"]] + [""]
    if ctx["failures"]:
        lines += ["## Failed methods", ""]
        for r in ctx["failures"]:
            lines += [f"### {r['method']} ({r['kind']}, run `{r['run_id']}`)", "", "```",
                      str(r["error"]).replace("```", "'''"), "```", ""]
    if with_charts:
        lines += ["## Charts", ""]
        for c in ctx["charts"]:
            lines += [f"### {c.title}", "", f"![{c.title}]({c.path.name})", "", c.caption, ""]
    return "\n".join(lines)


def render_html(ctx: dict) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2", "html"]))
    charts = [{"title": c.title, "caption": c.caption, "key": c.key,
               "data_uri": "data:image/png;base64," + base64.b64encode(c.path.read_bytes()).decode()}
              for c in ctx["charts"]]
    return env.get_template("report.html.j2").render(
        {**ctx, "charts": charts, "heads": [h for _, h, _ in COLUMNS],
         "rows": table_rows(ctx["summary"])})


# ---------------------------------------------------------------- the report

def _context(client: MlflowClient, parent_run_id: str, tracking_uri: str) -> dict:
    parent = _get_run(client, parent_run_id)
    if parent.data.tags.get(ROLE_TAG) == "child":
        raise ReportError(f"run {parent_run_id!r} is a benchmark child run, not a parent; its "
                          f"parent is {parent.data.tags.get(PARENT_TAG)!r}")
    notes: list[str] = []
    children = _latest_per_method(child_runs(tracking_uri, parent.info.run_id), notes)
    if not children:
        notes.append("The parent run has no child runs: nothing to compare.")
    rows = [_method_row(run) for run in children]
    baseline = _derive(rows, notes)
    failures = [r for r in rows if r["status"] != "FINISHED"]
    if failures:
        notes.append("Left out of the charts (did not finish): "
                     + ", ".join(f"{r['method']} ({r['status']})" for r in failures) + ".")
    finished = [r for r in rows if r["status"] == "FINISHED"]
    return {"header": _header(client, parent, tracking_uri), "summary": rows, "finished": finished,
            "failures": failures, "baseline": baseline, "notes": notes,
            "histories": _histories(client, finished),
            "colors": method_colors([r["method"] for r in rows]),
            "random_init_text": "The base model was randomly initialised (no pretrained weights "
            "were loaded), so these accuracies say nothing about pretrained models; use this run "
            "only to check that the pipeline works and to compare time and memory."}


def _write(ctx: dict, work: Path) -> list[Chart]:
    charts, chart_notes = draw_all(ctx["finished"], ctx["histories"], ctx["baseline"],
                                   ctx["colors"], work)
    ctx["charts"], ctx["notes"] = charts, ctx["notes"] + chart_notes
    summary = {"parent_run_id": ctx["header"]["parent_run_id"],
               "benchmark": ctx["header"]["benchmark"],
               "random_init": ctx["header"]["random_init"], "baseline_method": ctx["baseline"],
               "chart_methods": [r["method"] for r in ctx["finished"]],
               "methods": ctx["summary"], "notes": ctx["notes"]}
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
        client.log_artifacts(run_id, str(work), artifact_path=ARTIFACT_PATH)
        dest = out_dir / run_id
        _move_into_place(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ReportResult(dir=dest, markdown_path=dest / "report.md", html_path=dest / "report.html",
                        summary=ctx["summary"], charts=[dest / c.path.name for c in charts])


@task(name="generate-report", cache_policy=NO_CACHE)
def generate_report_task(parent_run_id: str, tracking_uri: str, out_dir: Path,
                         artifact_key: str = PREFECT_ARTIFACT_KEY) -> ReportResult:
    """Build the report and publish it (tables and notes; images stay in MLflow and the HTML)
    as a Prefect markdown artifact."""
    result = generate_report(parent_run_id, tracking_uri, out_dir)
    markdown = result.markdown_path.read_text(encoding="utf-8")
    # Relative image links would be broken in the Prefect UI, so point at the files instead.
    markdown = markdown.split("\n## Charts\n")[0] + (
        f"\n## Charts\n\nCharts and the full HTML report: `{result.html_path}` and the parent "
        f"run's `{ARTIFACT_PATH}/` artifacts in MLflow.\n")
    create_markdown_artifact(markdown=markdown, key=artifact_key,
                             description=f"peft-bench report for MLflow run {parent_run_id}")
    return result
