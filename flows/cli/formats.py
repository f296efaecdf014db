"""`--format` of `peft-bench compare` and `peft-bench report`: `table` is the terminal's view
(flows/cli/display.py); markdown, json and csv write the results document
(tasks/reporting/results.py, docs/results.md) for a page, a notebook or a spreadsheet. Light at
import (no MLflow, no pandas): the CLI's options are built from it on every start, completion
and --version included."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


COMPARE_HELP = ("table (for a terminal), or the results document as markdown, json or csv on "
                "stdout (docs/results.md)")
REPORT_HELP = ("table: print the report's paths; markdown, json or csv: also its results "
               "document (the folder's summary.json) on stdout, the paths then on stderr")


def benchmark_document(tracking_uri: str, parent_run_id: str,
                       baseline: Optional[str] = None) -> dict:
    """The results document of one benchmark, from MLflow; with `baseline`, its regression
    check is made against that run instead of the stored one. Both ids are checked first."""
    from tasks.analysis.aggregate import summarize
    from tasks.analysis.regression import check_against
    from tasks.config.schema import RegressionConfig
    from tasks.report import get_parent, report_context
    from tasks.reporting import results
    from tasks.tracking import runs

    client = runs.client_at(tracking_uri)
    parent = get_parent(client, parent_run_id, "--parent run")
    against = get_parent(client, baseline, "--baseline run") if baseline else None
    ctx = report_context(parent_run_id, tracking_uri)
    check = None
    if against is not None:  # the summary again: the context does not keep the aggregates
        check = check_against(client, summarize(client, parent), [against], RegressionConfig())
    return results.document(ctx, check, baseline)


def report_document(report_dir: Path) -> dict:
    """The document a report folder holds (its summary.json), not a second reading of MLflow."""
    from tasks.common import names

    return json.loads((Path(report_dir) / names.SUMMARY_JSON).read_text(encoding="utf-8"))


def write(doc: dict, fmt: Format) -> str:
    from tasks.reporting import results

    return results.WRITERS[fmt.value](doc)
