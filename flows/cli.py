"""`peft-bench`: run a benchmark, compare methods, rebuild a report, build the offline model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.stack import stack_app
from tasks.config import ConfigError

app = typer.Typer(help="peft-bench: Full fine-tuning vs LoRA vs DoRA vs QLoRA, with Prefect "
                       "and MLflow.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console(width=160)

COLUMNS = [("accuracy", "eval/accuracy", "{:.4f}"), ("f1", "eval/f1_macro", "{:.4f}"),
           ("train s", "train_time_s", "{:.1f}"), ("samples/s", "samples_per_s", "{:.1f}"),
           ("peak MB", "peak_memory_mb", "{:.0f}"), ("trainable", "trainable_params", "{:,.0f}"),
           ("trainable %", "trainable_pct", "{:.3f}"), ("model MB", "model_size_mb", "{:.2f}"),
           ("adapter MB", "adapter_size_mb", "{:.3f}")]


def runs_table(tracking_uri: str, parent_run_id: str) -> Table:
    """The parent's child runs, read back from MLflow."""
    from tasks.report import child_runs

    table = Table(title=f"benchmark {parent_run_id}")
    for col in ["method", "kind", "status", *[c[0] for c in COLUMNS]]:
        table.add_column(col, justify="left" if col in ("method", "kind", "status") else "right")
    for run in child_runs(tracking_uri, parent_run_id):
        m, tags = run.data.metrics, run.data.tags
        cells = [fmt.format(m[key]) if key in m else "-" for _, key, fmt in COLUMNS]
        table.add_row(tags.get("peft_bench.method", run.info.run_name),
                      tags.get("peft_bench.method_kind", "?"), run.info.status, *cells)
    return table


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(config: Path = typer.Argument(..., help="benchmark YAML, e.g. configs/quickstart.yaml"),
        methods: Optional[str] = typer.Option(None, help="comma-separated method names to run"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. training.lr=1e-4")) -> None:
    """Run a benchmark: every method, then the report. Exit 1 if a method failed."""
    from flows.benchmark import benchmark, resolve_config

    selected = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:  # validate here first, so bad input never starts a flow run
        resolve_config(str(config), set_, methods=selected)
    except ConfigError as e:
        _fail(str(e))
    try:
        result = benchmark(config_path=str(config), overrides=set_, methods=selected)
    except (ValueError, ConnectionError) as e:  # data/config/tracking errors from preflight
        _fail(str(e))
    console.print(runs_table(result["tracking_uri"], result["parent_run_id"]))
    console.print(f"report:  {result['report_html']}\n         {result['report_md']}")
    console.print(f"MLflow:  parent run {result['parent_run_id']}; open the UI with\n"
                  f"         mlflow ui --backend-store-uri {result['tracking_uri']}")
    if result["failed"]:
        _fail(f"failed methods: {', '.join(result['failed'])}", code=1)


def _tracking(tracking_uri: Optional[str], experiment: Optional[str]) -> tuple[str, str]:
    from tasks.config import TrackingConfig, tracking_from_files

    t = TrackingConfig(**tracking_from_files(Path("mlflow.yaml")))
    return tracking_uri or t.tracking_uri, experiment or t.experiment


@app.command()
def compare(experiment: Optional[str] = typer.Option(None, help="MLflow experiment name"),
            tracking_uri: Optional[str] = typer.Option(None, help="defaults to mlflow.yaml / env"),
            parent: Optional[str] = typer.Option(None, help="a parent run id (default: latest)")) -> None:
    """Print the latest benchmark's methods side by side, read from MLflow."""
    from tasks.report import latest_parent_run

    uri, exp = _tracking(tracking_uri, experiment)
    parent = parent or latest_parent_run(uri, exp)
    if parent is None:
        _fail(f"no benchmark runs in experiment {exp!r} at {uri}", code=1)
    console.print(runs_table(uri, parent))


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
