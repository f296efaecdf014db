"""`peft-bench join`: this host's ranks of a run that another host started (nnodes > 1).

The host that runs `peft-bench run` holds the job; every other host runs `peft-bench join` with
the same rendezvous settings as the config's training.distributed, once per child run it takes
part in (`--runs`). Its ranks get the job over the process group, train, and log nothing.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

JOIN_HELP = ("Run this host's ranks of a distributed run started on another host "
             "(training.distributed.nnodes > 1); same rendezvous settings as that config.")


def join(rdzv_endpoint: str = typer.Option(..., help="host:port of the rendezvous "
                                           "(training.distributed.rdzv_endpoint)."),
         nnodes: int = typer.Option(..., min=2, help="Hosts in the job."),
         nproc_per_node: int = typer.Option(1, min=1, help="Ranks on this host."),
         rdzv_id: str = typer.Option("peft-bench", help="training.distributed.rdzv_id."),
         backend: str = typer.Option("auto", help="auto, gloo or nccl."),
         device: str = typer.Option("cpu", help="cpu or cuda: picks the backend for auto."),
         runs: int = typer.Option(1, min=1, help="Child runs to take part in, one after "
                                  "another."),
         join_timeout_s: float = typer.Option(600.0, help="Seconds to wait at the rendezvous.")
         ) -> None:
    from flows.orchestration import torchrun
    from tasks.config.distributed import DistributedConfig

    d = DistributedConfig(nproc_per_node=nproc_per_node, nnodes=nnodes, backend=backend,
                          rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                          join_timeout_s=join_timeout_s)
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="peft-bench-join-") as tmp:
            typer.echo(f"joining {rdzv_endpoint} ({rdzv_id}), run {i + 1} of {runs}")
            proc = torchrun.start(d, Path(tmp), device, job_file=None)
            code = torchrun.wait(proc, None)
            if code != 0:
                typer.secho(str(torchrun.failure(Path(tmp), code)), fg="red", err=True)
                raise typer.Exit(1)
    typer.echo("done")
