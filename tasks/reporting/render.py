"""Rendering the report: the results table (shared by Markdown and HTML so they cannot
disagree), the verdict table against the reference method, a sweep's chosen settings and grid
points, and the two documents."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Optional

from jinja2 import Environment, FileSystemLoader, select_autoescape

from tasks.analysis.aggregate import Comparison
from tasks.analysis.stats import Interval
from tasks.common import names
from tasks.reporting.charts import human

TEMPLATES = Path(__file__).parent / "templates"


def _ms(v: float) -> str:
    return f"{1000 * v:,.1f}"


# (summary key, header, format, shown with ± its 95% interval half-width)
COLUMNS = [
    ("accuracy", "Accuracy", "{:.4f}", True), ("f1_macro", "F1 (macro)", "{:.4f}", True),
    ("eval_loss", "Eval loss", "{:.4f}", True), ("train_time_s", "Train time (s)", "{:,.1f}", True),
    ("train_time_pct_of_ref", "% of ref time", "{:.0f}%", False),
    ("step_time_median_s", "Median step (ms)", _ms, True),
    ("samples_per_s", "Samples/s", "{:,.1f}", True), ("tokens_per_s", "Tokens/s", "{:,.0f}", True),
    ("peak_memory_mb", "Peak mem (MB)", "{:,.0f}", True),
    ("trainable_params", "Trainable params", human, False),
    ("trainable_pct", "Trainable %", "{:.3g}%", False),
    ("model_size_mb", "Model size (MB)", "{:,.1f}", False),
    ("adapter_size_mb", "Adapter (MB)", "{:,.2f}", False),
]
TIMING = {"train_time_s", "train_time_pct_of_ref", "step_time_median_s", "samples_per_s",
          "tokens_per_s"}
WARN = "⚠"


def _fmt(value, fmt) -> str:
    return fmt(value) if callable(fmt) else fmt.format(value)


def _cell(row: dict, key: str, fmt, with_ci: bool) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    text = _fmt(value, fmt)
    ci = row.get(f"{key}_ci") if with_ci else None
    if ci:  # a t-interval is symmetric about the mean: mean ± half-width says it all
        text += " ± " + _fmt((ci[1] - ci[0]) / 2, fmt)
    if key in TIMING and row.get("timing_warnings"):
        text += " " + WARN
    return text


def table_rows(summary: list[dict]) -> list[dict]:
    out = []
    for r in summary:
        seeds = f"{r[names.N_SEEDS]}/{len(r['seeds'])}"
        out.append({"method": r["method"], "kind": r["kind"], "status": r["status"],
                    "error": r["error"], "pareto": bool(r.get("pareto_optimal")), "seeds": seeds,
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
        final = _cell(c, "accuracy", "{:.4f}", True)
        out.append({"method": c["method"], "point": c["point"] or "none (no point finished)",
                    "value": _num(c["value"], "{:.4f}"),
                    "points": f"{c['points']} ({c['finished']} finished, {c['failed']} failed)",
                    "reused": str(c["reused"]),
                    "final": final + (f" ({c[names.N_SEEDS]} seeds)" if c[names.N_SEEDS] else "")})
    return out


def grid_rows(sweep: dict) -> list[dict]:
    return [{"method": g["method"], "point": g["point"], "status": g["status"],
             "cells": [_num(g["value"], "{:.4f}"), _num(g["train_time_s"], "{:,.1f}"),
                       _num(g["peak_memory_mb"], "{:,.0f}"), _num(g["trainable_params"], human)],
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


INTERVALS_TEXT = (
    "Means are over the seeds that finished; ± is the half-width of the 95% Student-t interval "
    "(t(0.975, n−1)·s/√n). With one seed there is no interval. Few seeds give wide intervals "
    "(two seeds multiply s/√n by 12.7): treat a difference as real only when the verdict says "
    "significant. Verdicts pair the seeds: the accuracy difference is a t-interval over the "
    "per-seed differences; time and memory ratios are geometric means with t-intervals on the "
    "log scale; McNemar's exact test compares the two methods' per-example predictions on the "
    "same evaluation rows, seed by seed.")


# ---------------------------------------------------------------- Markdown

def _md_escape(text: str, limit: int = 0) -> str:
    text = " ".join(str(text).split())  # a newline would end the table row
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _md_table(summary: list[dict]) -> list[str]:
    heads = ["Method", "Kind", "Status", "Seeds"] + [h for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * 4 + "---:|" * len(COLUMNS)]
    for t in table_rows(summary):
        status = t["status"] if not t["error"] else f"**{t['status']}**: {_md_escape(t['error'], 160)}"
        name = _md_escape(t["method"]) + (" ★" if t["pareto"] else "")
        lines.append("| " + " | ".join([name, t["kind"], status, t["seeds"]] + t["cells"]) + " |")
    return lines


def _md_verdicts(ctx: dict) -> list[str]:
    ref = ctx["header"]["reference"]
    if not ctx["verdicts"]:
        return []
    lines = [f"## Verdicts against {ref}", "",
             "| Method | Δ accuracy vs " + ref + " [95% CI] | Verdict | Basis | McNemar per seed "
             "| Time vs " + ref + " | Memory vs " + ref + " |", "|---|---:|---|---|---|---:|---:|"]
    for v in ctx["verdicts"]:
        lines.append(f"| {_md_escape(v['method'])} | {v['accuracy_diff']} | {v['significance']} | "
                     f"{v['basis']} | {v['mcnemar']} | {v['time']} | {v['memory']} |")
    return lines + [""] + [f"- {_md_escape(v['sentence'])}" for v in ctx["verdicts"]] + [""]


def _md_alerts(ctx: dict) -> list[str]:
    lines = []
    reg = ctx["regressions"]
    if reg and reg.flags:
        lines += ["> **Regression:** " + "; ".join(_md_escape(f.message) for f in reg.flags), ""]
    for w in ctx["timing_warnings"]:
        lines += [f"> **{WARN} Timing contaminated:** {_md_escape(w)}. Its timing columns are "
                  "marked ⚠ and it is not ranked on time.", ""]
    return lines


def _md_regression(ctx: dict) -> list[str]:
    reg = ctx["regressions"]
    if reg is None:
        return ["## Regression check", "", "Not run for this benchmark.", ""]
    lines = ["## Regression check", ""]
    if not reg.baselines:
        lines.append("No earlier FINISHED run of this benchmark and config to compare with.")
    elif not reg.flags:
        lines.append(f"No regression against {len(reg.baselines)} earlier run(s): "
                     + ", ".join(f"`{r}`" for r in reg.baselines) + ".")
    else:
        lines += [f"- **{_md_escape(f.message)}**" for f in reg.flags]
    return lines + [f"- {_md_escape(n)}" for n in reg.notes] + [""]


def _md_budget(ctx: dict) -> list[str]:
    if not ctx["budget"]:
        return []
    lines = [f"- **{b['label']}:** {b['text']}" + (f" {b['note']}" if b["note"] else "")
             for b in ctx["budget"].values()]
    return lines + ["", BUDGET_TEXT, ""]


def _md_splits(h: dict) -> list[str]:
    parts = [f"final runs scored on `{h['scored_on']}`"] if h["scored_on"] else []
    if h["selected_on"]:
        parts.append(f"settings chosen on `{h['selected_on']}` (the grid runs)")
    return ["- **Splits:** " + "; ".join(parts)] if parts else []


def _md_sweep(ctx: dict) -> list[str]:
    sweep = ctx["sweep"]
    if not sweep:
        return []
    heads = sweep_heads(sweep)
    lines = ["## Chosen settings", "", "| " + " | ".join(heads["chosen"]) + " |",
             "|---|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_md_escape(c[k]) for k in ("method", "point", "value", "points",
                                                             "reused", "final")) + " |"
              for c in chosen_rows(sweep)]
    lines += ["", SWEEP_TEXT, "", "### Grid points", "", "| " + " | ".join(heads["grid"]) + " |",
              "|---|---|---|" + "---:|" * 4 + "---|---|"]
    for g in grid_rows(sweep):
        cells = [g["method"], g["point"], g["status"], *g["cells"], g["reused"],
                 "★" if g["chosen"] else ""]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return lines + [""]


def _md_header(h: dict) -> list[str]:
    return [f"- **Parent run:** `{h['parent_run_id']}` (experiment `{h['experiment']}`)",
            f"- **Model:** `{h['model']}`",
            f"- **Dataset:** `{h['dataset']}` (data digest `{h['data_digest']}`)",
            *_md_splits(h),
            f"- **Seeds:** {', '.join(map(str, h['seeds'])) or 'unknown'}; "
            f"**reference method:** {h['reference']}",
            f"- **Device:** {h['device']}", f"- **Date:** {h['date']}",
            f"- **Git SHA:** `{h['git_sha']}`",
            "- **Versions:** " + (", ".join(f"{k} {v}" for k, v in h["versions"].items())
                                  or "unknown"),
            f"- **Browse the runs:** `{h['ui_command']}`"]


def parent_note(ctx: dict, limit: int = 7900) -> str:
    """The parent run's description in the MLflow UI: the report's results table and
    verdicts (MLflow keeps 8,000 characters of a tag)."""
    h = ctx["header"]
    lines = [f"**{h['benchmark']}**: {len(ctx['summary'])} methods, seeds "
             f"{', '.join(map(str, h['seeds']))}; full report in the `report/` artifacts.", ""]
    lines += _md_table(ctx["summary"]) + [""] + _md_verdicts(ctx)
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(ctx: dict, with_charts: bool = True) -> str:
    h = ctx["header"]
    lines = [f"# peft-bench report: {h['benchmark']}", ""] + _md_budget(ctx)
    if h["random_init"]:
        lines += [f"> **Warning:** {ctx['random_init_text']}", ""]
    if h["optimistic"]:
        lines += [f"> **Warning, optimistic numbers:** {h['optimistic']}", ""]
    lines += _md_alerts(ctx)
    lines += _md_header(h) + ["", "## Results", ""]
    lines += _md_table(ctx["summary"])
    lines += ["", f"★ = no other method is faster and more accurate beyond the 95% intervals. "
              f"{WARN} = timing contaminated by other processes. {INTERVALS_TEXT}", ""]
    if ctx["reused"]:
        lines += [f"↺ {reused_text(ctx['reused'])}", ""]
    lines += _md_sweep(ctx) + _md_verdicts(ctx) + _md_regression(ctx)
    if ctx["notes"]:
        lines += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in ctx["notes"]] + [""]
    if ctx["failures"]:
        lines += ["## Failed runs", ""]
        for r in ctx["failures"]:
            lines += [f"### {r['method']} seed {r['seed']} ({r['kind']}, run `{r['run_id']}`)", "",
                      "```", str(r["error"]).replace("```", "'''"), "```", ""]
    if with_charts:
        lines += ["## Charts", ""]
        for c in ctx["charts"]:
            lines += [f"### {c.title}", "", f"![{c.title}]({c.path.name})", "", c.caption, ""]
    return "\n".join(lines)


BUDGET_TEXT = (
    "For each budget, the most accurate method that fits it: mean accuracy over the seeds "
    "against mean peak memory or mean training time. A step up is only worth its cost when the "
    "verdicts below call the difference significant.")
WIDE_CHARTS = ("eval_accuracy", "sweep_sensitivity", "sweep_pareto")


def render_html(ctx: dict) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2", "html"]))
    charts = [{"title": c.title, "caption": c.caption, "key": c.key,
               "data_uri": "data:image/png;base64," + base64.b64encode(c.path.read_bytes()).decode()}
              for c in ctx["charts"]]
    sweep = ctx["sweep"]
    return env.get_template("report.html.j2").render(
        {**ctx, "charts": charts, "heads": [h for _, h, _, _ in COLUMNS],
         "rows": table_rows(ctx["summary"]), "intervals_text": INTERVALS_TEXT, "warn": WARN,
         "budget_text": BUDGET_TEXT, "wide_charts": WIDE_CHARTS,
         "reused_text": reused_text(ctx["reused"]) if ctx["reused"] else None,
         "sweep_heads": sweep_heads(sweep) if sweep else None, "sweep_text": SWEEP_TEXT,
         "chosen_rows": chosen_rows(sweep) if sweep else [],
         "grid_rows": grid_rows(sweep) if sweep else []})
