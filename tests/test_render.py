"""The two documents from one hand-made report context, no MLflow: Markdown is never
HTML-escaped and HTML always is; a template that names something its Page lacks fails instead
of printing nothing; the results table of the report and of the parent run's note are one."""
from __future__ import annotations

import pytest
from jinja2 import UndefinedError

from tasks.reporting import render
from tasks.reporting.context import ReportContext

NASTY = "lora<b>&amp;|x"


def context(**over) -> ReportContext:
    row = {"method": NASTY, "kind": "lora", "status": "FINISHED", "n_seeds": 1, "seeds": [1],
           "error": None, "timing_warnings": [], "pareto_optimal": True}
    header = {"benchmark": "b<1>", "parent_run_id": "p", "experiment": "e", "model": "m",
              "dataset": "d", "data_digest": "x", "device": "cpu", "date": "today",
              "git_sha": "s", "seeds": [1], "reference": NASTY, "versions": {"torch": "2"},
              "random_init": False, "ui_command": "mlflow ui", "params": {"a": "<p>"},
              "scored_on": None, "selected_on": None, "optimistic": None}
    fields = dict(header=header, summary=[row], finished=[row], failures=[],
                  notes=["a <note> & more"], budget=None, sweep=None, grids={}, reused=[],
                  verdicts=[], regressions=None, timing_warnings=[], histories={}, colors={})
    return ReportContext(**{**fields, **over})


def test_markdown_is_not_escaped_and_html_is():
    md, html = render.render_markdown(context()), render.render_html(context())
    assert "# peft-bench report: b<1>" in md and "- a <note> & more" in md
    assert "| lora<b>&amp;\\|x ★ | lora |" in md  # only the table's own escaping
    assert "b&lt;1&gt;" in html and "a &lt;note&gt; &amp; more" in html
    assert "lora&lt;b&gt;&amp;amp;|x" in html and "<b>&amp;" not in html


def test_a_name_the_page_lacks_fails_the_rendering():
    env = render._env(markdown=True)
    template = env.from_string("{{ header.benchmark }} {{ no_such_field }}\n")
    with pytest.raises(UndefinedError):
        template.render(vars(render.page(context())))


def test_the_note_and_the_report_share_the_results_table():
    md, note = render.render_markdown(context()), render.parent_note(context())
    table = [line for line in note.splitlines() if line.startswith("|")]
    assert table and "\n".join(table) in md
