"""The benchmark report, read back from MLflow.

Everything in the report comes from the tracking store (never from the pipeline's memory), so
a report can be regenerated later, by anyone, from the parent run id alone. Per method it shows
the mean over seeds with a 95% interval, and a verdict against the reference method (paired by
seed, `tasks.analysis.aggregate`); the regression alarm's flags (`tasks.analysis.regression`) come first, after
the answers to the budget questions (the most accurate method within a memory or time budget).
For a sweep it adds each method's chosen settings, every grid point and two sweep charts
(`tasks.reporting.charts_sweep`), and it says which split scored the finals and which chose the settings.
The report is built in a temp folder next to its destination and renamed into place at the
end, so a failure leaves either the previous report or nothing, never half a report.
"""
from __future__ import annotations

import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Run
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.analysis.aggregate import MethodAggregate, Summary, summarize
from tasks.analysis.regression import Check
from tasks.analysis.stats import pareto_beyond_noise
from tasks.common import names
from tasks.reporting import outdir, results
from tasks.reporting.charts import Chart, draw_all, method_colors
from tasks.reporting.charts_sweep import draw_sweep, frontier
from tasks.reporting.context import ReportContext
from tasks.reporting.render import parent_note, render_html, render_markdown, verdict_rows
from tasks.tracking import runs, store
from tasks.tracking.runs import ui_path

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
    client = runs.client_at(tracking_uri)
    eid = store.experiment_id(client, experiment)
    run = store.first(client, eid, store.parent_query()) if eid is not None else None
    return run.info.run_id if run else None


def read_children(tracking_uri: str, parent_run_id: str) -> list[Run]:
    """The parent's child runs (deleted ones left out), oldest first."""
    client = runs.client_at(tracking_uri)
    return store.children_of(client, get_parent(client, parent_run_id))


def get_parent(client: MlflowClient, run_id: str, what: str = "parent run") -> Run:
    """A benchmark's parent run; store.UnknownRun for an id the store does not hold."""
    run = store.get_run(client, run_id, what)
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
        "config_hash": tags.get(names.CONFIG_HASH),  # the results document's identity
        "started_at": started.isoformat(timespec="seconds"),
        "versions": {k.removeprefix("versions."): v for k, v in sorted(params.items())
                     if k.startswith("versions.")},
        "random_init": tags.get(names.RANDOM_INIT, "").strip().lower() == "true",
        "ui_command": f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}, then open "
                      f"http://127.0.0.1:5000/{ui_path(parent.info.experiment_id)}",
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
           names.FAILED_SEEDS: [r.seed for r in agg.failures],
           names.RUN_IDS: [r.run_id for r in agg.runs],
           "error": "; ".join(f"seed {r.seed}: {r.error}" for r in agg.failures) or None,
           names.TIMING_WARNINGS: agg.timing_warnings}
    for key in names.CHILD_METRICS:
        iv = agg.stats.get(key)
        row[key] = None if iv is None else iv.mean
        if key in names.AGGREGATED:
            row[names.row_std(key)] = None if iv is None else iv.std
            row[names.row_ci(key)] = (None if iv is None or not iv.has_interval
                                      else [iv.low, iv.high])
    for key in names.INTEGER_KEYS:
        if row[key] is not None and float(row[key]).is_integer():
            row[key] = int(row[key])
    return row


def _derive(rows: list[dict], summary: Summary, notes: list[str]) -> None:
    time, acc = names.TRAIN_TIME, names.ACCURACY
    ref = next((r for r in rows if r["method"] == summary.reference and r[time]), None)
    if ref is None:
        notes.append("The reference method has no training time: times are shown in absolute "
                     "seconds, not relative to it.")
    for r in rows:
        t = r[time]
        r[names.PCT_OF_REF_TIME] = (None if ref is None or t is None else
                                    100.0 if r is ref else 100 * t / ref[time])
    # A method is starred when no other method is better on both axes beyond the intervals.
    # Methods with contaminated timings are not ranked on time at all.
    aggs = {m.method: m for m in summary.methods.values()}
    points = {r["method"]: (aggs[r["method"]].stats[time], aggs[r["method"]].stats[acc])
              for r in rows if r[names.N_SEEDS] and time in aggs[r["method"]].stats
              and acc in aggs[r["method"]].stats and not r[names.TIMING_WARNINGS]}
    best = pareto_beyond_noise(points)
    for r in rows:
        r[names.PARETO_OPTIMAL] = (r["method"] in best) if r["method"] in points else None


# (key, question, budget format, unit) of the budget answers
BUDGETS = ((names.PEAK_MEMORY, "memory", "{:,.0f}", "MB"), (names.TRAIN_TIME, "time", "{:,.1f}", "s"))


def budget_answers(finished: list[dict]) -> Optional[dict]:
    """Under a memory (time) budget, the most accurate method that fits: one line each, the
    Pareto staircase of the finished methods' mean accuracy against their mean peak memory
    (training time). Methods with contaminated timings sit out the time answer."""
    acc = names.ACCURACY
    if not any(r.get(acc) is not None for r in finished):
        return None
    out = {}
    for key, question, fmt, unit in BUDGETS:
        tainted = [r["method"] for r in finished
                   if key == names.TRAIN_TIME and r[names.TIMING_WARNINGS]]
        steps = [{"method": r["method"], "budget": r[key], acc: r[acc]}
                 for r in frontier([r for r in finished if r["method"] not in tainted
                                    and r.get(key) is not None and r.get(acc) is not None],
                                   cost=lambda r: r[key], accuracy=lambda r: r[acc])]
        if not steps:
            continue
        text = "; ".join(f"≥ {fmt.format(s['budget'])} {unit} → {s['method']} "
                         f"({s[acc]:.3f})" for s in steps)
        note = (f"Left out: {', '.join(tainted)} (timing contaminated by other processes)."
                if tainted else None)
        out[question] = {"label": f"Under a {question} budget", "text": text, "note": note,
                         "steps": steps, "left_out": tainted}
    return out or None


# ---------------------------------------------------------------- sweeps and splits

def _selection_split(client: MlflowClient, summary: Summary, params: dict) -> Optional[str]:
    """The split the grid runs were scored on, from their tags (the config as a fallback)."""
    found = set()
    for points in summary.grids.values():
        if points:
            found.add(store.get_run(client, points[0].run_id).data.tags.get(names.EVAL_SPLIT))
    found.discard(None)
    return ", ".join(sorted(found)) or params.get("data.eval_split")


def _grid_row(method: str, g, metric: str) -> dict:
    return {"method": method, "point": g.label, "status": g.status, "value": g.metrics.get(metric),
            **{k: g.metrics.get(k) for k in (names.TRAIN_TIME, names.PEAK_MEMORY,
                                              names.TRAINABLE_PARAMS)},
            "reused": g.reused_from is not None, "chosen": g.chosen, "run_id": g.run_id}


def sweep_context(client: MlflowClient, summary: Summary, params: dict,
                  rows: list[dict]) -> Optional[dict]:
    """Per method, the chosen point and its grid; None for a benchmark without a sweep."""
    if not summary.grids:
        return None
    metric = params.get("sweep.metric")
    metric = metric if metric in names.CHILD_METRICS else names.ACCURACY
    order = [r["method"] for r in rows]
    methods = [m for m in order if m in summary.grids] + [m for m in summary.grids
                                                          if m not in order]
    by_row = {r["method"]: r for r in rows}
    chosen, grid = [], []
    for m in methods:
        points = summary.grids[m]
        best = next((g for g in points if g.chosen), None)
        done = sum(g.status == "FINISHED" for g in points)
        final = by_row.get(m, {})
        chosen.append({"method": m, "point": best.label if best else None,
                       "value": best.metrics.get(metric) if best else None,
                       "points": len(points), "finished": done, "failed": len(points) - done,
                       "reused": sum(g.reused_from is not None for g in points),
                       **{k: final.get(k) for k in (names.ACCURACY,
                                                    names.row_ci(names.ACCURACY))},
                       names.N_SEEDS: final.get(names.N_SEEDS, 0)})
        grid += [_grid_row(m, g, metric) for g in points]
    return {"metric": metric, "metric_name": names.CHILD_METRICS[metric],
            "selection_split": _selection_split(client, summary, params),
            "chosen": chosen, "grid": grid}


def _splits(client: MlflowClient, parent: Run, summary: Summary, sweep: Optional[dict]) -> dict:
    """Which split scored the finals (their tags), which chose the settings, and whether the
    two are the same split, which makes the final numbers optimistic."""
    latest = {r.run_id for m in summary.methods.values() for r in m.runs}
    scored = sorted({r.data.tags[names.EVAL_SPLIT] for r in store.children_of(client, parent)
                     if r.info.run_id in latest and names.EVAL_SPLIT in r.data.tags})
    scored_on = ", ".join(scored) or None
    selected_on = sweep["selection_split"] if sweep else None
    params = parent.data.params
    test, select = params.get("data.test_split"), params.get("data.eval_split")
    same = (test not in (None, "", "None") and test == select) or bool(
        sweep and scored_on and scored_on == selected_on)
    split = scored_on or test
    warning = (f"The final runs were scored on the split that chose the settings ({split}): "
               "the numbers are optimistic, since selection has already seen that split. Set "
               "data.test_split to a held-out split, or data.test_from_train, for an unbiased "
               "estimate." if same else None)
    return {"scored_on": scored_on, "selected_on": selected_on, "optimistic": warning}


def reused_finals(summary: Summary) -> list[dict]:
    """The final runs copied from an earlier identical run rather than trained."""
    runs = {r.run_id: r for m in summary.methods.values() for r in m.runs}
    return [{"method": runs[i].method, "seed": runs[i].seed, "run_id": i}
            for i in summary.reused if i in runs]


# ---------------------------------------------------------------- the report

def _context(client: MlflowClient, parent_run_id: str, tracking_uri: str) -> ReportContext:
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
    sweep = sweep_context(client, summary, parent.data.params, rows)
    header = {**_header(client, parent, tracking_uri, summary),
              **_splits(client, parent, summary, sweep)}
    return ReportContext(
        header=header, summary=rows, finished=finished, failures=failures, notes=notes,
        budget=budget_answers(finished), sweep=sweep, grids=summary.grids,
        reused=reused_finals(summary), verdicts=verdict_rows(summary.comparisons),
        regressions=Check.from_json(parent.data.tags.get(names.REGRESSIONS)),
        timing_warnings=[w for r in rows for w in r[names.TIMING_WARNINGS]],
        histories=_histories(client, [m for m in summary.methods.values() if m.finished]),
        colors=method_colors([r["method"] for r in rows]))


def _charts(ctx: ReportContext, work: Path) -> list[Chart]:
    charts, notes = draw_all(ctx.finished, ctx.histories, ctx.header["reference"], ctx.colors,
                             work)
    sweep = ctx.sweep
    if sweep:
        colors = method_colors([r["method"] for r in ctx.summary]  # same order: same colours
                               + [m for m in ctx.grids if m not in ctx.colors])
        more, more_notes = draw_sweep({c["method"]: ctx.grids[c["method"]]
                                       for c in sweep["chosen"]}, sweep["metric"],
                                      sweep["selection_split"], colors, work)
        charts, notes = charts + more, notes + more_notes
    ctx.charts, ctx.notes = charts, ctx.notes + notes
    return charts


def report_context(parent_run_id: str, tracking_uri: str) -> ReportContext:
    """What the report is built from, without writing it (`peft-bench compare --format`)."""
    return _context(runs.client_at(tracking_uri), parent_run_id, tracking_uri)


def _write(ctx: ReportContext, work: Path) -> list[Chart]:
    charts = _charts(ctx, work)
    # The same document as `peft-bench compare --format json` (docs/results.md).
    text = results.to_json(results.document(ctx))
    (work / names.SUMMARY_JSON).write_text(text, encoding="utf-8")
    (work / names.REPORT_MD).write_text(render_markdown(ctx), encoding="utf-8")
    (work / names.REPORT_HTML).write_text(render_html(ctx), encoding="utf-8")
    return charts


def generate_report(parent_run_id: str, tracking_uri: str, out_dir: Path) -> ReportResult:
    """Write report.md, report.html, charts and summary.json into out_dir/<parent_run_id>/ and
    log them to the parent run under `report/`."""
    client = runs.client_at(tracking_uri)
    ctx = _context(client, parent_run_id, tracking_uri)  # fails before anything is written
    run_id = ctx.header["parent_run_id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_id}.", suffix=".tmp", dir=out_dir))
    work.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    try:
        charts = _write(ctx, work)
        # Logged from the temp folder, before the rename, so a logging failure leaves no report.
        client.log_artifacts(run_id, str(work), artifact_path=names.REPORT_ARTIFACTS)
        client.set_tag(run_id, names.RUN_NOTE, parent_note(ctx))  # the UI's run description
        dest = out_dir / run_id
        outdir.swap_in(work, dest)  # a user's own files in an older report folder stay
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ReportResult(dir=dest, markdown_path=dest / names.REPORT_MD,
                        html_path=dest / names.REPORT_HTML, summary=ctx.summary,
                        charts=[dest / c.path.name for c in charts])


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
