"""Rendering the report: the results table (shared by Markdown and HTML so they cannot
disagree), the verdict table against the reference method, a sweep's chosen settings and grid
points, and the two documents. The rows are built here, in Python; the templates
(templates/report.md.j2, report.html.j2, and note.md.j2 for the parent run's description) only
lay out one `Page` of them."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from tasks.analysis.aggregate import Comparison
from tasks.analysis.regression import Check
from tasks.analysis.stats import Interval
from tasks.common import names
from tasks.reporting.charts import Chart, human
from tasks.reporting.context import ReportContext

TEMPLATES = Path(__file__).parent / "templates"


def _ms(v: float) -> str:
    return f"{1000 * v:,.1f}"


# (summary key, header, format, shown with its 95% interval: ± its half-width on the linear
# scale, [low, high] for the log-scale keys, whose interval is not symmetric about the mean)
COLUMNS = [
    (names.ACCURACY, "Accuracy", "{:.4f}", True), (names.F1_MACRO, "F1 (macro)", "{:.4f}", True),
    (names.FINAL_LOSS, "Eval loss", "{:.4f}", True),
    (names.TRAIN_TIME, "Train time (s)", "{:,.1f}", True),
    (names.PCT_OF_REF_TIME, "% of ref time", "{:.0f}%", False),
    (names.STEP_TIME_MEDIAN, "Median step (ms)", _ms, True),
    (names.SAMPLES_PER_S, "Samples/s", "{:,.1f}", True),
    (names.TOKENS_PER_S, "Tokens/s", "{:,.0f}", True),
    (names.PEAK_MEMORY, "Peak mem (MB)", "{:,.0f}", True),
    (names.TRAINABLE_PARAMS, "Trainable params", human, False),
    (names.TRAINABLE_PCT, "Trainable %", "{:.3g}%", False),
    (names.MODEL_SIZE, "Model size (MB)", "{:,.1f}", False),
    (names.ADAPTER_SIZE, "Adapter (MB)", "{:,.2f}", False),
]
TIMING = {names.TRAIN_TIME, names.PCT_OF_REF_TIME, names.STEP_TIME_MEDIAN, names.SAMPLES_PER_S,
          names.TOKENS_PER_S}
WARN = "⚠"
LOG_MARK = "†"  # on the header of a column whose mean and interval are on the log scale


def heads() -> list[str]:
    return [f"{h} {LOG_MARK}" if ci and key in names.LOG_SCALE else h
            for key, h, _, ci in COLUMNS]


def _fmt(value, fmt) -> str:
    return fmt(value) if callable(fmt) else fmt.format(value)


def _cell(row: dict, key: str, fmt, with_ci: bool) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    text = _fmt(value, fmt)
    ci = row.get(names.row_ci(key)) if with_ci else None
    if ci and key in names.LOG_SCALE:  # exp of a symmetric interval is not symmetric
        text += f" [{_fmt(ci[0], fmt)}, {_fmt(ci[1], fmt)}]"
    elif ci:  # a linear t-interval is symmetric about the mean: ± half-width says it all
        text += " ± " + _fmt((ci[1] - ci[0]) / 2, fmt)
    if key in TIMING and row.get(names.TIMING_WARNINGS):
        text += " " + WARN
    return text


def table_rows(summary: list[dict]) -> list[dict]:
    out = []
    for r in summary:
        seeds = f"{r[names.N_SEEDS]}/{len(r['seeds'])}"
        out.append({"method": r["method"], "kind": r["kind"], "status": r["status"],
                    "error": r["error"], "pareto": bool(r.get(names.PARETO_OPTIMAL)), "seeds": seeds,
                    "cells": [_cell(r, key, fmt, ci) for key, _, fmt, ci in COLUMNS]})
    return out


# ---------------------------------------------------------------- verdicts

def _pt(v: float) -> str:
    return f"{100 * v:+.1f}"


def _ratio(iv: Optional[Interval]) -> str:
    if iv is None:
        return "—"
    text = f"{iv.mean:.2f}×"
    return text + (f" [{iv.low:.2f}, {iv.high:.2f}]" if iv.has_interval else "")


def _iv_json(iv: Optional[Interval]) -> Optional[dict]:
    if iv is None:
        return None
    return {"mean": iv.mean, "ci": [iv.low, iv.high] if iv.has_interval else None, "n": iv.n}


def verdict_rows(comparisons: list[Comparison]) -> list[dict]:
    """One row per method against the reference: the sentence and the numbers behind it."""
    rows = []
    for c in comparisons:
        d = c.acc_diff
        diff = "—" if d is None else (f"{_pt(d.mean)} pt" + (
            f" [{_pt(d.low)}, {_pt(d.high)}]" if d.has_interval else ""))
        sig = {True: "significant", False: "not significant", None: "undecided"}[c.significant]
        mcnemar = ", ".join(f"seed {s}: p = {m.p:.3g} ({m.b} vs {m.c})"
                            for s, m in sorted(c.mcnemar.items())) or "—"
        rows.append({
            "method": c.method, "reference": c.reference, "accuracy_diff": diff,
            "significance": sig, "basis": c.basis, "mcnemar": mcnemar,
            "time": _ratio(c.time_ratio), "memory": _ratio(c.memory_ratio),
            "sentence": f"{c.method} vs {c.reference}: {diff}, {sig}; {_ratio(c.time_ratio)} "
                        f"time; {_ratio(c.memory_ratio)} memory",
            "numbers": {"accuracy_diff": _iv_json(d), "significant": c.significant,
                        "time_ratio": _iv_json(c.time_ratio),
                        "memory_ratio": _iv_json(c.memory_ratio),
                        "mcnemar": {str(s): {"b": m.b, "c": m.c, "p": m.p}
                                    for s, m in c.mcnemar.items()}}})
    return rows


# ---------------------------------------------------------------- sweeps

def _num(value, fmt) -> str:
    return "—" if value is None else _fmt(value, fmt)


def chosen_rows(sweep: dict) -> list[dict]:
    """Per method: the chosen point, its selection metric, the grid's size and the final
    accuracy (mean ± 95% half-width over the seeds)."""
    out = []
    for c in sweep["chosen"]:
        final = _cell(c, names.ACCURACY, "{:.4f}", True)
        out.append({"method": c["method"], "point": c["point"] or "none (no point finished)",
                    "value": _num(c["value"], "{:.4f}"),
                    "points": f"{c['points']} ({c['finished']} finished, {c['failed']} failed)",
                    "reused": str(c["reused"]),
                    "final": final + (f" ({c[names.N_SEEDS]} seeds)" if c[names.N_SEEDS] else "")})
    return out


def grid_rows(sweep: dict) -> list[dict]:
    return [{"method": g["method"], "point": g["point"], "status": g["status"],
             "cells": [_num(g["value"], "{:.4f}"), _num(g[names.TRAIN_TIME], "{:,.1f}"),
                       _num(g[names.PEAK_MEMORY], "{:,.0f}"),
                       _num(g[names.TRAINABLE_PARAMS], human)],
             "reused": "yes" if g["reused"] else "no", "chosen": g["chosen"]}
            for g in sweep["grid"]]


def sweep_heads(sweep: dict) -> dict:
    where = f" on {sweep['selection_split']}" if sweep["selection_split"] else ""
    metric = f"{sweep['metric_name']}{where}"
    return {"chosen": ["Method", "Chosen point", metric, "Grid points", "Reused grid points",
                       "Final accuracy (mean ± 95% CI)"],
            "grid": ["Method", "Point", "Status", metric, "Train time (s)", "Peak mem (MB)",
                     "Trainable params", "Reused", "Chosen"]}


def reused_text(reused: list[dict]) -> str:
    runs = ", ".join(f"{r['method']} seed {r['seed']}" for r in reused)
    return (f"{len(reused)} final run(s) reused from earlier identical runs (same settings, data "
            f"and code), not trained again: {runs}. Their times and memory are the original "
            "runs'.")


SWEEP_TEXT = (
    "Each grid point trained once, under the first seed, and was scored on the selection "
    "split; the chosen point of each method then ran under every seed on the final split. "
    "★ = the chosen point. Reused = copied from an earlier identical run, not trained again.")


SCALE_TEXT = (
    f"{LOG_MARK} = on the log scale: the geometric mean over seeds and, in brackets, its 95% "
    "interval exp(mean(ln x) ± t(0.975, n−1)·s/√n), s the standard deviation of ln x; it never "
    "reaches 0 and reaches further above the mean than below. If a seed measured 0 (a CPU peak "
    "of 0 MB), that method's column is the arithmetic mean with the linear interval clipped at "
    "0 instead. Without " + LOG_MARK + ": the arithmetic mean ± the half-width of the 95% "
    "Student-t interval, t(0.975, n−1)·s/√n (linear scale).")
INTERVALS_TEXT = (
    "Means are over the seeds that finished. " + SCALE_TEXT + " With one seed there is no "
    "interval. Few seeds give wide intervals "
    "(two seeds multiply s/√n by 12.7): treat a difference as real only when the verdict says "
    "significant. Verdicts pair the seeds: the accuracy difference is a t-interval over the "
    "per-seed differences; time and memory ratios are geometric means with t-intervals on the "
    "log scale; McNemar's exact test compares the two methods' per-example predictions on the "
    "same evaluation rows, seed by seed.")


BUDGET_TEXT = (
    "For each budget, the most accurate method that fits it: mean accuracy over the seeds "
    "against mean peak memory or mean training time. A step up is only worth its cost when the "
    "verdicts below call the difference significant.")
RANDOM_INIT_TEXT = (
    "The base model was randomly initialised (no pretrained weights were loaded), so these "
    "accuracies say nothing about pretrained models; use this run only to check that the "
    "pipeline works and to compare time and memory.")
WIDE_CHARTS = (names.CHART_EVAL_ACCURACY, names.CHART_SWEEP_SENSITIVITY, names.CHART_SWEEP_PARETO)


# ---------------------------------------------------------------- the documents

@dataclass
class Page:
    """What the templates see, besides the fixed texts in `GLOBALS`: the report's rows and
    texts, ready made. Built in one place (`page`); a name a template uses that is neither a
    field here nor a global fails the rendering (StrictUndefined) instead of printing nothing."""
    header: dict
    budget: Optional[dict]
    regressions: Optional[Check]
    timing_warnings: list[str]
    heads: list[str]           # the results table's number columns
    rows: list[dict]           # table_rows: the results table, one row per method
    reused_text: Optional[str]
    sweep: Optional[dict]
    sweep_heads: Optional[dict]
    chosen_rows: list[dict]
    grid_rows: list[dict]
    verdicts: list[dict]
    notes: list[str]
    failures: list[dict]
    charts: list[dict]         # title, caption, file (in the report folder), data_uri (HTML)
    with_charts: bool = True


GLOBALS = {"warn": WARN, "intervals_text": INTERVALS_TEXT, "scale_text": SCALE_TEXT,
           "budget_text": BUDGET_TEXT,
           "sweep_text": SWEEP_TEXT, "random_init_text": RANDOM_INIT_TEXT,
           "wide_charts": WIDE_CHARTS, "report_artifacts": names.REPORT_ARTIFACTS}


def _chart(c: Chart, embed: bool) -> dict:
    uri = ("data:image/png;base64," + base64.b64encode(c.path.read_bytes()).decode()
           if embed else None)
    return {"title": c.title, "caption": c.caption, "file": c.path.name, "data_uri": uri}


def page(ctx: ReportContext, embed_charts: bool = False, with_charts: bool = True) -> Page:
    sweep = ctx.sweep
    return Page(header=ctx.header, budget=ctx.budget, regressions=ctx.regressions,
                timing_warnings=ctx.timing_warnings, heads=heads(),
                rows=table_rows(ctx.summary),
                reused_text=reused_text(ctx.reused) if ctx.reused else None,
                sweep=sweep, sweep_heads=sweep_heads(sweep) if sweep else None,
                chosen_rows=chosen_rows(sweep) if sweep else [],
                grid_rows=grid_rows(sweep) if sweep else [],
                verdicts=ctx.verdicts, notes=ctx.notes, failures=ctx.failures,
                charts=[_chart(c, embed_charts) for c in ctx.charts], with_charts=with_charts)


def md_escape(text, limit: int = 0) -> str:
    """The `md` filter: a table cell's text on one line, cut to `limit`, its pipes literal."""
    text = " ".join(str(text).split())  # a newline would end the table row
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


# Escaping by template name: HTML-escaped for the HTML, never for the Markdown (its `md` filter
# keeps what a table cell needs, and a "<" in an error message stays a "<").
AUTOESCAPE = select_autoescape(enabled_extensions=("html.j2", "html"),
                               disabled_extensions=("md.j2",), default=False)


@lru_cache(maxsize=None)
def _env(markdown: bool) -> Environment:
    """Markdown is line-based: there a line holding only a tag writes nothing, and every line the
    template writes ends in a newline."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=AUTOESCAPE,
                      undefined=StrictUndefined, trim_blocks=markdown, lstrip_blocks=markdown,
                      keep_trailing_newline=markdown)
    env.filters["md"] = md_escape
    env.globals.update(GLOBALS)
    return env


def _render(template: str, p: Page) -> str:
    markdown = template.endswith(".md.j2")
    text = _env(markdown).get_template(template).render(vars(p))
    return text.removesuffix("\n") if markdown else text  # lines joined, not terminated


def parent_note(ctx: ReportContext, limit: int = 7900) -> str:
    """The parent run's description in the MLflow UI: the report's results table and
    verdicts (MLflow keeps 8,000 characters of a tag)."""
    text = _render("note.md.j2", page(ctx))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(ctx: ReportContext, with_charts: bool = True) -> str:
    return _render("report.md.j2", page(ctx, with_charts=with_charts))


def render_html(ctx: ReportContext) -> str:
    return _render("report.html.j2", page(ctx, embed_charts=True))
