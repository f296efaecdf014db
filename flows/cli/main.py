"""`peft-bench`: run a benchmark, compare methods, rebuild a report, build the offline model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.cli.formats import COMPARE_HELP, REPORT_HELP, Format
from flows.cli.join import JOIN_HELP, join
from flows.infra.stack_cli import stack_app

app = typer.Typer(help="peft-bench: Full fine-tuning vs LoRA vs DoRA vs QLoRA, with Prefect "
                       "and MLflow.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.command("join", help=JOIN_HELP)(join)
console = Console(width=160)
err_console = Console(width=160, stderr=True)  # beside a document on stdout (--format json)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib import metadata

    try:
        version = metadata.version("peft-bench")
    except metadata.PackageNotFoundError:  # a source tree that was never pip-installed
        version = "unknown (not installed as a package: pip install -e .)"
    typer.echo(f"peft-bench {version}")
    raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                      is_eager=True, help="Print the installed version and exit.")
         ) -> None:
    """peft-bench: Full fine-tuning vs LoRA vs DoRA vs QLoRA, with Prefect and MLflow."""


def show_benchmark(tracking_uri: str, parent_run_id: str, baseline: Optional[str] = None) -> None:
    """The methods, the verdicts and the regression check of one benchmark, from MLflow. With
    `baseline`, the regression check is made against that run instead of the stored one."""

    from flows.cli.display import methods_table, regression_lines, verdicts_table
    from tasks.analysis.aggregate import summarize
    from tasks.analysis.regression import Check, check_against
    from tasks.common import names
    from tasks.config.schema import RegressionConfig
    from tasks.report import get_parent
    from tasks.tracking import runs

    client = runs.client_at(tracking_uri)
    parent = get_parent(client, parent_run_id, "--parent run")
    against_run = get_parent(client, baseline, "--baseline run") if baseline else None
    summary = summarize(client, parent)  # both ids checked first: no table, then an error
    console.print(methods_table(summary))
    if (verdicts := verdicts_table(summary)) is not None:
        console.print(verdicts)
    if baseline:
        check = check_against(client, summary, [against_run], RegressionConfig())
        against = f"baseline run {baseline}"
    else:
        check = Check.from_json(summary.parent.data.tags.get(names.REGRESSIONS))
        against = "earlier run(s) of the same benchmark and config"
    for line in regression_lines(check, against):
        console.print(line, highlight=False)


def _fail(message: str, code: int = 2, err: bool = False) -> None:
    """`err`: on stderr, where stdout carries a document (a redirect must not swallow it)."""
    import sys

    from tasks.common.secrets import redact

    if "tasks.common.progress" in sys.modules:  # the error on a line of its own, not after a bar
        sys.modules["tasks.common.progress"].close_all()

    (err_console if err else console).print(f"[red]error:[/red] {redact(message)}",
                                            highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(config: Optional[Path] = typer.Argument(
            None, help="benchmark YAML, e.g. configs/quickstart.yaml (not with --resume)"),
        methods: Optional[str] = typer.Option(None, help="comma-separated method names to run"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. training.lr=1e-4"),
        resume: Optional[str] = typer.Option(
            None, help="continue an interrupted benchmark: its parent run id"),
        server_timeout: Optional[float] = typer.Option(
            None, help="seconds to wait for the temporary Prefect server (default 120)"),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="show every library's log lines, not only ours")) -> None:
    """Run a benchmark: every method under every seed, then the report. Exit 1 if a run
    failed, 2 on bad input, 3 if a regression was flagged with regression.fail_on_regression,
    4 if the MLflow store or the Prefect server cannot be reached or started (or the MLflow
    server goes away mid-run), 143 on SIGTERM, 130 on Ctrl-C."""
    import os

    from flows.cli import launch
    from tasks.common.secrets import install_log_filter

    # MLflow's own logger setup would print its INFO lines to the console whatever we do later.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    install_log_filter()
    previous = launch.on_sigterm()  # kill, systemd, Docker, Kubernetes: like Ctrl-C, exit 143
    selected = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    masked = launch.mask_overrides(set_)
    try:
        cfg, as_dict = _launch(config, set_, selected, resume, server_timeout, verbose)
        try:
            _run_flow(cfg, config, as_dict, masked, selected, resume, verbose)
        finally:
            _restore_logging()
    except BaseException as e:
        from tasks.common.errors import stopped_by

        if isinstance(e, typer.Exit) or (why := stopped_by(e)) is None:
            raise
        code = launch.EXIT_TERMINATED if getattr(e, "signal", None) else 130
        _fail(f"{why}; its MLflow runs are marked FAILED", code=code)
    finally:
        import signal

        signal.signal(signal.SIGTERM, previous)


def _launch(config: Optional[Path], set_: list[str], selected: Optional[list[str]],
            resume: Optional[str], server_timeout: Optional[float], verbose: bool):
    """Everything that can be checked is checked before a server or a flow starts."""
    from flows.cli import launch

    try:
        cfg, as_dict = launch.load(config, set_, selected, resume)
        launch.check_light(cfg)  # the output folder first: the run's log file goes there
        quiet_other_libraries(run_log(cfg), verbose)
        launch.check(cfg, lambda line: console.print(f"[yellow]{line}[/yellow]", highlight=False))
        launch.server(server_timeout)
    except launch.LaunchError as e:
        _restore_logging()
        _fail(str(e), code=e.code)
    return cfg, as_dict


def _restore_logging() -> None:
    import sys

    if "flows.cli.console" in sys.modules:
        sys.modules["flows.cli.console"].restore()


def _run_flow(cfg, config: Optional[Path], as_dict: Optional[dict], masked: list[str],
              selected: Optional[list[str]], resume: Optional[str], verbose: bool = False) -> None:
    from flows.benchmark import AllRunsFailed, RegressionError, benchmark
    from flows.cli import console as quiet
    from tasks.common.secrets import redact
    from tasks.config.build import public_dump
    from tasks.tracking.outage import StoreUnreachable

    log_file = quiet.log_path() or run_log(cfg)
    quiet.install()
    quiet.quiet_other_libraries(log_file, verbose)  # again: importing Prefect reset logging

    regressed = False
    source = ({"config_path": str(config)} if config is not None
              else {"config": public_dump(cfg)})
    try:
        result = benchmark(**source, overrides=masked if config is not None else None,
                           methods=selected if config is not None else None, resume=resume,
                           prechecked=True)
    except RegressionError as e:
        result, regressed = e.result, True
    except AllRunsFailed as e:
        _fail(f"{e}; see the report and `peft-bench compare`", code=1)
    except StoreUnreachable as e:
        _fail(str(e), code=4)
    except (ValueError, ConnectionError) as e:  # checks the flow repeats for deployments
        _fail(redact(str(e)))
    _keep_log(cfg, result["parent_run_id"], log_file)
    show_benchmark(cfg.tracking.tracking_uri, result["parent_run_id"])
    console.print(f"report:  {result['report_html']}\n         {result['report_md']}")
    from tasks.tracking.runs import experiment_id, ui_path

    page = ui_path(experiment_id(cfg.tracking))
    console.print(f"MLflow:  parent run {result['parent_run_id']}; open the UI with\n"
                  f"         mlflow ui --backend-store-uri {result['tracking_uri']}\n"
                  f"         and http://127.0.0.1:5000/{page} (methods compared)")
    if result["failed"]:
        _fail(f"failed runs: {', '.join(result['failed'])}", code=1)
    if regressed:
        _fail("regression flagged and regression.fail_on_regression is set", code=3)


@app.command()
def plan(config: Path = typer.Argument(..., help="benchmark YAML, e.g. configs/quickstart-sweep.yaml"),
         set_: list[str] = typer.Option([], "--set", help="override, e.g. sweep.max_runs=200"),
         methods: Optional[str] = typer.Option(None, help="comma-separated method names"),
         workers: int = typer.Option(1, min=1, help="workers the runs would spread over")) -> None:
    """Print the runs a benchmark would start (grid points and final runs) and an estimate of
    their time from the MLflow history of the same model and data; trains nothing."""
    from flows.cli import launch
    from flows.orchestration.plan import describe
    from tasks.data.dataset import validate_data
    from tasks.data.labels import DataError

    selected = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        cfg, _ = launch.load(config, set_, selected, None)
        summary = validate_data(cfg.data)
    except launch.LaunchError as e:
        _fail(str(e), code=e.code)
    except DataError as e:
        _fail(str(e))
    for item in describe(cfg, summary.train_rows, summary.digest, workers):
        console.print(item, highlight=False) if isinstance(item, str) else console.print(item)


@app.command()
def export(run_id: str = typer.Argument(..., help="a finished method run (child or grid point)"),
           out: Path = typer.Argument(..., help="folder to write"),
           merged: bool = typer.Option(False, help="write a plain transformers model with the "
                                                   "adapter merged in"),
           force: bool = typer.Option(False, "--force", help="write into a non-empty folder "
                                      "(only the files peft-bench writes are replaced)"),
           tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env")) -> None:
    """Write a run's adapter in Hugging Face peft's layout (load it with
    peft.PeftModel.from_pretrained), or with --merged an ordinary model. Exit 2 for an unknown
    run id or a non-empty folder without --force, 1 if the run cannot be exported."""
    from tasks.reporting.export import ExportError, export_run
    from tasks.reporting.outdir import DestinationError
    from tasks.tracking.store import UnknownRun

    uri, _ = _tracking(tracking_uri, None)
    try:
        path = export_run(uri, run_id, out, merged, force)
    except (UnknownRun, DestinationError) as e:
        _fail(str(e))
    except ExportError as e:
        _fail(str(e), code=1)
    console.print(f"{'merged model' if merged else 'adapter'} written to {path}")


@app.command()
def promote(run_id: str = typer.Argument(..., help="a finished adapter run"),
            name: str = typer.Option(..., help="registered model name"),
            alias: Optional[str] = typer.Option(None, help="e.g. champion"),
            tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env")) -> None:
    """Register a run's peft adapter as a new version of a registered model in MLflow."""
    from tasks.reporting.export import ExportError
    from tasks.reporting.export import promote as register
    from tasks.tracking.store import UnknownRun

    uri, _ = _tracking(tracking_uri, None)
    try:
        version = register(uri, run_id, name, alias)
    except UnknownRun as e:
        _fail(str(e))
    except ExportError as e:
        _fail(str(e), code=1)
    console.print(f"registered {name} version {version}" + (f" as @{alias}" if alias else ""))


def run_log(cfg) -> Path:
    import time

    return Path(cfg.report.output_dir) / "logs" / time.strftime("run-%Y%m%d-%H%M%S.log")


def quiet_other_libraries(log_file: Path, verbose: bool) -> None:
    from flows.cli.console import quiet_other_libraries as quiet

    quiet(log_file, verbose)


def _keep_log(cfg, parent_run_id: str, log_file: Path) -> None:
    """The run's full log (every library's lines) as an artifact of the parent run."""
    import logging

    from tasks.common import names
    from tasks.tracking import runs as tracking

    for handler in logging.getLogger().handlers:
        handler.flush()
    if log_file.is_file():
        tracking.log_artifact(parent_run_id, cfg.tracking, log_file, names.LOG_ARTIFACTS)
        console.print(f"log:     {log_file} (and in the parent run's logs/ artifacts)")


@app.command("close-stale")
def close_stale(experiment: Optional[str] = typer.Option(None, help="MLflow experiment name"),
                tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env")) -> None:
    """Close as FAILED every RUNNING run whose process is gone (killed, out of memory), and stop
    temporary Prefect servers whose owner is gone."""
    from flows.infra.tempserver import reap_orphans
    from tasks.config.schema import TrackingConfig
    from tasks.tracking.lifecycle import close_stale_runs

    uri, exp = _tracking(tracking_uri, experiment)
    closed = close_stale_runs(TrackingConfig(tracking_uri=uri, experiment=exp))
    for run_id in closed:
        console.print(f"closed stale run {run_id}")
    servers = reap_orphans()
    console.print(f"{len(closed)} stale run(s) closed, {len(servers)} orphaned server(s) stopped")


def _tracking(tracking_uri: Optional[str], experiment: Optional[str]) -> tuple[str, str]:
    from tasks.config.build import tracking_from_files
    from tasks.config.schema import TrackingConfig

    t = TrackingConfig(**tracking_from_files(Path("mlflow.yaml")))
    return tracking_uri or t.tracking_uri, experiment or t.experiment


@app.command()
def compare(experiment: Optional[str] = typer.Option(None, help="MLflow experiment name"),
            tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env"),
            parent: Optional[str] = typer.Option(None, help="a parent run id (default: latest)"),
            baseline: Optional[str] = typer.Option(
                None, help="a parent run id to check the benchmark against for regressions"),
            fmt: Format = typer.Option(Format.table, "--format", case_sensitive=False,
                                       help=COMPARE_HELP)) -> None:
    """Print a benchmark's methods (mean ± 95% CI over seeds), its verdicts against the
    reference method and its regression check, read from MLflow. With --format
    markdown|json|csv, the results document on stdout (errors on stderr)."""
    from flows.cli import formats
    from tasks.report import ReportError, latest_parent_run
    from tasks.tracking.store import UnknownRun

    data = fmt is not Format.table
    uri, exp = _tracking(tracking_uri, experiment)
    parent = parent or latest_parent_run(uri, exp)
    if parent is None:
        _fail(f"no benchmark runs in experiment {exp!r} at {uri}", code=1, err=data)
    try:
        if data:
            typer.echo(formats.write(formats.benchmark_document(uri, parent, baseline), fmt),
                       nl=False)
        else:
            show_benchmark(uri, parent, baseline)
    except UnknownRun as e:
        _fail(str(e), err=data)
    except ReportError as e:
        _fail(str(e), code=1, err=data)


@app.command()
def report(parent_run_id: str = typer.Argument(..., help="the benchmark's parent run id"),
           out: Path = typer.Option(Path("reports"), help="output folder"),
           tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env"),
           fmt: Format = typer.Option(Format.table, "--format", case_sensitive=False,
                                      help=REPORT_HELP)) -> None:
    """Rebuild a benchmark's report from MLflow (exit 2 for an unknown run id)."""
    from flows.cli import formats
    from tasks.report import generate_report
    from tasks.tracking.store import UnknownRun

    data = fmt is not Format.table
    uri, _ = _tracking(tracking_uri, None)
    try:
        result = generate_report(parent_run_id, uri, out)
    except UnknownRun as e:
        _fail(str(e), err=data)
    except Exception as e:  # noqa: BLE001 - any failure is reported, not traced
        _fail(str(e), code=1, err=data)
    paths = f"report: {result.html_path}\n        {result.markdown_path}"
    (err_console if data else console).print(paths)
    if data:
        typer.echo(formats.write(formats.report_document(result.dir), fmt), nl=False)


@app.command("make-tiny-model")
def make_tiny_model_cmd(out: Path = typer.Argument(..., help="model directory to write"),
                        data: Path = typer.Option(..., help="folder with train.tsv"),
                        n_layer: int = typer.Option(2), n_embd: int = typer.Option(64),
                        vocab_size: int = typer.Option(1024)) -> None:
    """Build a small, randomly initialised GPT-2-style model offline (tokenizer trained on the
    data), loadable with from_pretrained."""
    import transformers

    from tasks.models.tiny import make_tiny_model

    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar
    try:
        path = make_tiny_model(out, data, vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd)
    except FileNotFoundError as e:
        _fail(str(e))
    console.print(f"tiny model written to {path}")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
