"""`peft-bench`: run a benchmark, compare methods, rebuild a report, build the offline model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.stack import stack_app
from tasks.config import ConfigError

app = typer.Typer(help="peft-bench: Full fine-tuning vs LoRA vs DoRA vs QLoRA, with Prefect "
                       "and MLflow.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console(width=160)



def show_benchmark(tracking_uri: str, parent_run_id: str, baseline: Optional[str] = None) -> None:
    """The methods, the verdicts and the regression check of one benchmark, from MLflow. With
    `baseline`, the regression check is made against that run instead of the stored one."""
    from mlflow import MlflowClient

    from flows.display import methods_table, regression_lines, verdicts_table
    from tasks import names
    from tasks.aggregate import summarize
    from tasks.config import RegressionConfig
    from tasks.regression import Check, check_against
    from tasks.report import get_parent

    client = MlflowClient(tracking_uri)
    summary = summarize(client, get_parent(client, parent_run_id))
    console.print(methods_table(summary))
    if (verdicts := verdicts_table(summary)) is not None:
        console.print(verdicts)
    if baseline:
        check = check_against(client, summary, [get_parent(client, baseline)], RegressionConfig())
        against = f"baseline run {baseline}"
    else:
        check = Check.from_json(summary.parent.data.tags.get(names.REGRESSIONS))
        against = "earlier run(s) of the same benchmark and config"
    for line in regression_lines(check, against):
        console.print(line, highlight=False)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(config: Path = typer.Argument(..., help="benchmark YAML, e.g. configs/quickstart.yaml"),
        methods: Optional[str] = typer.Option(None, help="comma-separated method names to run"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. training.lr=1e-4")) -> None:
    """Run a benchmark: every method under every seed, then the report. Exit 1 if a run
    failed, 3 if a regression was flagged with regression.fail_on_regression."""
    from flows.benchmark import RegressionError, benchmark, resolve_config

    selected = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:  # validate here first, so bad input never starts a flow run
        resolve_config(str(config), set_, methods=selected)
    except ConfigError as e:
        _fail(str(e))
    regressed = False
    try:
        result = benchmark(config_path=str(config), overrides=set_, methods=selected)
    except RegressionError as e:
        result, regressed = e.result, True
    except (ValueError, ConnectionError) as e:  # data/config/tracking errors from preflight
        _fail(str(e))
    show_benchmark(result["tracking_uri"], result["parent_run_id"])
    console.print(f"report:  {result['report_html']}\n         {result['report_md']}")
    console.print(f"MLflow:  parent run {result['parent_run_id']}; open the UI with\n"
                  f"         mlflow ui --backend-store-uri {result['tracking_uri']}")
    if result["failed"]:
        _fail(f"failed runs: {', '.join(result['failed'])}", code=1)
    if regressed:
        _fail("regression flagged and regression.fail_on_regression is set", code=3)


def _tracking(tracking_uri: Optional[str], experiment: Optional[str]) -> tuple[str, str]:
    from tasks.config import TrackingConfig, tracking_from_files

    t = TrackingConfig(**tracking_from_files(Path("mlflow.yaml")))
    return tracking_uri or t.tracking_uri, experiment or t.experiment


@app.command()
def compare(experiment: Optional[str] = typer.Option(None, help="MLflow experiment name"),
            tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env"),
            parent: Optional[str] = typer.Option(None, help="a parent run id (default: latest)"),
            baseline: Optional[str] = typer.Option(
                None, help="a parent run id to check the benchmark against for regressions")) -> None:
    """Print a benchmark's methods (mean ± 95% CI over seeds), its verdicts against the
    reference method and its regression check, read from MLflow."""
    from tasks.report import ReportError, latest_parent_run

    uri, exp = _tracking(tracking_uri, experiment)
    parent = parent or latest_parent_run(uri, exp)
    if parent is None:
        _fail(f"no benchmark runs in experiment {exp!r} at {uri}", code=1)
    try:
        show_benchmark(uri, parent, baseline)
    except ReportError as e:
        _fail(str(e), code=1)


@app.command()
def report(parent_run_id: str = typer.Argument(..., help="the benchmark's parent run id"),
           out: Path = typer.Option(Path("reports"), help="output folder"),
           tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env")) -> None:
    """Rebuild a benchmark's report from MLflow."""
    from tasks.report import generate_report

    uri, _ = _tracking(tracking_uri, None)
    try:
        result = generate_report(parent_run_id, uri, out)
    except Exception as e:  # noqa: BLE001 - any failure is reported, not traced
        _fail(str(e), code=1)
    console.print(f"report: {result.html_path}\n        {result.markdown_path}")


@app.command("make-tiny-model")
def make_tiny_model_cmd(out: Path = typer.Argument(..., help="model directory to write"),
                        data: Path = typer.Option(..., help="folder with train.tsv"),
                        n_layer: int = typer.Option(2), n_embd: int = typer.Option(64),
                        vocab_size: int = typer.Option(1024)) -> None:
    """Build a small, randomly initialised GPT-2-style model offline (tokenizer trained on the
    data), loadable with from_pretrained."""
    from tasks.tiny_model import make_tiny_model

    try:
        path = make_tiny_model(out, data, vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd)
    except FileNotFoundError as e:
        _fail(str(e))
    console.print(f"tiny model written to {path}")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
