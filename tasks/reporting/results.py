"""A benchmark's results as data: one document (schema version `SCHEMA_VERSION`), built here
from the report's context and nowhere else, for `peft-bench compare --format` and `peft-bench
report --format` and as the report folder's summary.json. docs/results.md describes every field.

The document is the report's numbers, not a second computation of them: the method rows are
the report's rows (tasks/report.py `method_row`), flattened for a spreadsheet (each interval
also as two plain numbers, the verdict against the reference as columns of its own); the
verdicts are the report's verdict rows. JSON, CSV and Markdown are three writings of it.
"""
from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from importlib import metadata
from typing import Optional

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from tasks.analysis.regression import Check
from tasks.common import names
from tasks.reporting.context import ReportContext
from tasks.reporting.render import COLUMNS, TEMPLATES, md_escape, table_rows

# Bumped only when a field is removed, renamed or changes meaning; new fields keep the version
# (readers ignore keys they do not know). docs/results.md says the same to users.
SCHEMA_VERSION = 1

# The benchmark's identity: (document key, the report header's key).
IDENTITY = (("parent_run_id", "parent_run_id"), ("benchmark", "benchmark"),
            ("experiment", "experiment"), ("config_hash", "config_hash"),
            ("started_at", "started_at"), ("seeds", "seeds"),
            ("reference", "reference"), ("random_init", "random_init"), ("model", "model"),
            ("dataset", "dataset"), ("data_digest", "data_digest"), ("device", "device"),
            ("git_sha", "git_sha"), ("versions", "versions"))
# The rest of the top level, after "methods" and "verdicts", in this order.
SECTIONS = ("regression", "regressions", "budget_answers", "splits", "chart_methods", "sweep",
            "reused_finals", names.TIMING_WARNINGS, "notes")
# Where the paired verdict's numbers sit in a verdict row's "numbers" (render.verdict_rows).
PAIRED_FROM = ((names.ACC_DIFF, "accuracy_diff"), (names.TIME_RATIO, "time_ratio"),
               (names.MEMORY_RATIO, "memory_ratio"))


def _metric_fields() -> list[str]:
    out = []
    for key in names.CHILD_METRICS:  # the mean under the plain key, as in the report's rows
        out.append(key)
        if key in names.AGGREGATED:
            out += [names.row_std(key), names.row_ci(key), names.agg(key, "ci_low"),
                    names.agg(key, "ci_high")]
    return out


# Every method's fields, in this order: the JSON's method objects have exactly these keys and
# the CSV exactly these columns.
METHOD_FIELDS = (
    "parent_run_id", "benchmark", "method", "kind", "status", names.N_SEEDS, "seeds",
    names.FAILED_SEEDS, names.RUN_IDS, "error", names.TIMING_WARNINGS, *_metric_fields(),
    names.PCT_OF_REF_TIME, names.PARETO_OPTIMAL, "reference",
    *(names.paired(key, stat) for key, _ in PAIRED_FROM for stat in names.PAIRED_STATS),
    "paired_seeds", "significant", "verdict", "verdict_basis", "regressed_metrics")
TOP_FIELDS = ("schema_version", "peft_bench_version", *(k for k, _ in IDENTITY), "methods",
              "verdicts", *SECTIONS)


def _version() -> Optional[str]:
    try:
        return metadata.version("peft-bench")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


def _paired(row: dict, verdict: Optional[dict]) -> dict:
    out: dict = {names.paired(k, s): None for k, _ in PAIRED_FROM for s in names.PAIRED_STATS}
    out.update(paired_seeds=None, significant=None, verdict=None, verdict_basis=None)
    if verdict is None:  # the reference itself, or a method with no finished seed
        return out
    numbers = verdict["numbers"]
    for key, source in PAIRED_FROM:
        iv = numbers[source]
        if iv is None:
            continue
        ci = iv["ci"] or (None, None)
        out.update({names.paired(key, "mean"): iv["mean"], names.paired(key, "ci_low"): ci[0],
                    names.paired(key, "ci_high"): ci[1]})
    diff = numbers["accuracy_diff"]
    out.update(paired_seeds=diff["n"] if diff else 0, significant=numbers["significant"],
               verdict=verdict["significance"], verdict_basis=verdict["basis"])
    return out


def method_entry(row: dict, header: dict, verdict: Optional[dict],
                 check: Optional[Check]) -> dict:
    """One method of the document: the report's row, its intervals also as plain bounds, its
    verdict against the reference and the metrics the regression check flagged."""
    flat = dict(row, parent_run_id=header["parent_run_id"], benchmark=header["benchmark"],
                reference=header["reference"])
    for key in names.AGGREGATED:
        ci = row.get(names.row_ci(key)) or (None, None)
        flat[names.agg(key, "ci_low")], flat[names.agg(key, "ci_high")] = ci
    flat.update(_paired(row, verdict))
    flat["regressed_metrics"] = (None if check is None else
                                 [f.metric for f in check.flags if f.method == row["method"]])
    return {k: flat.get(k) for k in METHOD_FIELDS}


def regression_section(check: Optional[Check], baseline: Optional[str]) -> Optional[dict]:
    if check is None:
        return None
    return {"against": "baseline" if baseline else "history", "baseline_run": baseline,
            "baselines": list(check.baselines),
            "flags": [{"method": f.method, "metric": f.metric, "old": f.old, "new": f.new,
                       "tolerance": f.tolerance, "runs": list(f.runs), "message": f.message}
                      for f in check.flags],
            "notes": list(check.notes)}


def document(ctx: ReportContext, check: Optional[Check] = None,
             baseline: Optional[str] = None) -> dict:
    """The results document of one benchmark. The regression check is the one stored on the
    parent run (ctx.regressions) unless `baseline` names the run `check` was made against."""
    check = check if baseline else ctx.regressions
    h = ctx.header
    verdicts = {v["method"]: v for v in ctx.verdicts}
    doc = {"schema_version": SCHEMA_VERSION, "peft_bench_version": _version(),
           **{key: h.get(source) for key, source in IDENTITY},
           "methods": [method_entry(r, h, verdicts.get(r["method"]), check) for r in ctx.summary],
           "verdicts": ctx.verdicts,
           "regression": regression_section(check, baseline),
           "regressions": None if check is None else [f.message for f in check.flags],
           "budget_answers": ctx.budget,
           "splits": {k: h.get(k) for k in ("scored_on", "selected_on", "optimistic")},
           "chart_methods": [r["method"] for r in ctx.finished],
           "sweep": ctx.sweep, "reused_finals": ctx.reused,
           names.TIMING_WARNINGS: ctx.timing_warnings, "notes": ctx.notes}
    return {k: doc[k] for k in TOP_FIELDS}


# ---------------------------------------------------------------- the three writings

def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def csv_cell(value) -> str:
    """Text as it is, null as an empty cell, anything else (numbers, true/false, lists) as its
    JSON: a float keeps every digit, and json.loads reads any cell but a text one back."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, allow_nan=False)


def to_csv(doc: dict) -> str:
    """One row per method, the columns METHOD_FIELDS; quoting by the csv module."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METHOD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for m in doc["methods"]:
        writer.writerow({k: csv_cell(m[k]) for k in METHOD_FIELDS})
    return out.getvalue()


@lru_cache(maxsize=None)
def _markdown_env() -> Environment:
    # As render.py's Markdown environment: the tables come from the same macros as the report's.
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=False,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters["md"] = md_escape
    return env


def to_markdown(doc: dict) -> str:
    """The tables: methods (as the report's results table), verdicts, and the regression check."""
    template = _markdown_env().get_template("results.md.j2")
    return template.render(doc=doc, rows=table_rows(doc["methods"]),
                           heads=[h for _, h, _, _ in COLUMNS])


WRITERS = {"json": to_json, "csv": to_csv, "markdown": to_markdown}
