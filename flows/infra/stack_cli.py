"""`peft-bench stack up | status | down`: the typer commands over flows/infra/stack.py, kept
apart so that the stack's library code (used by tests and benchmarks) stays one readable file."""
from __future__ import annotations

from pathlib import Path

import typer

from flows.infra.stack import DEFAULT_DIR, DEFAULT_POOL, StackError, stack_status, stack_up, stop_all

stack_app = typer.Typer(help="A local Prefect server + MLflow server + process workers on "
                             "127.0.0.1, all under one folder (default .stack/).",
                        no_args_is_help=True)
DirOpt = typer.Option(DEFAULT_DIR, "--dir", help="Stack folder: PIDs, logs, data, env file.")


@stack_app.command("up")
def up_cmd(stack_dir: Path = DirOpt,
           prefect_port: int = typer.Option(4200, help="Prefect port (a free one if busy)."),
           mlflow_port: int = typer.Option(5000, help="MLflow port (a free one if busy)."),
           pool: str = typer.Option(DEFAULT_POOL, help="Process work pool to create and poll."),
           workers: int = typer.Option(1, min=0, help="Number of workers."),
           timeout: float = typer.Option(120, help="Seconds to wait for each process."),
           ui: bool = typer.Option(True, help="Serve the Prefect UI.")) -> None:
    """Start the stack and wait until every part answers."""
    try:
        state = stack_up(stack_dir, prefect_port, mlflow_port, pool, workers, timeout, ui,
                         echo=typer.echo)
    except StackError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"\nPrefect UI  {state['prefect_url']}\nMLflow UI   {state['mlflow_url']}\n"
               f"Run `source {stack_dir}/env` to point prefect/mlflow/peft-bench at them.")


@stack_app.command("down")
def down_cmd(stack_dir: Path = DirOpt,
             grace: float = typer.Option(10.0, help="Seconds between SIGTERM and SIGKILL.")) -> None:
    """Stop every process of the stack (safe to run twice); data and logs stay."""
    stopped = stop_all(stack_dir, grace)
    typer.echo(f"stopped {', '.join(p.name for p in stopped)}" if stopped
               else f"nothing running in {stack_dir}")


@stack_app.command("status")
def status_cmd(stack_dir: Path = DirOpt) -> None:
    """Show each process of the stack: PID, alive, healthy, URL, log."""
    rows = stack_status(stack_dir)
    if not rows:
        typer.echo(f"no stack in {stack_dir}")
        raise typer.Exit(1)
    for r in rows:
        state = "up" if r["alive"] else "DOWN"
        if r["healthy"] is False:
            state += " (unhealthy)"
        typer.echo(f"{r['name']:<15} pid {r['pid']:<8} {state:<16} {r['url'] or '':<24} {r['log']}")
    if not all(r["alive"] for r in rows):
        raise typer.Exit(1)
