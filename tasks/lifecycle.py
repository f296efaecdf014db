"""Who holds each open MLflow run, and closing the runs whose holder is gone.

Every run peft-bench opens carries `peft_bench.owner = host:pid:start-time` of the process that
works on it. A process killed with SIGKILL, by the OOM killer or a pre-emption cannot close its
runs; at every start (and with `peft-bench close-stale`) peft-bench closes as FAILED each RUNNING
run of the experiment whose owner process no longer exists on this host, with the reason in
`peft_bench.error`. The start time tells a live owner from a new process that reused its pid.
Runs owned on another host are left alone: their liveness cannot be checked from here (with
`dispatch: deployments` the waiting parent and the zombie automation close those).

A new sqlite store is created and migrated under a file lock: MLflow's first connection creates
the tables, and two first runs at once would otherwise race in the migration.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import psutil

from tasks import names
from tasks.config import TrackingConfig

_prepared: set[str] = set()


def owner_tag() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def process_alive(pid: int, started: float) -> Optional[bool]:
    """Whether the process `pid` that started at `started` (epoch seconds) still runs: the
    start time tells it from a new process that reused the pid. None when it cannot be told."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


def owner_alive(tag: str) -> Optional[bool]:
    """True or False for an owner on this host; None for another host or a malformed tag."""
    try:
        host, pid, started = tag.rsplit(":", 2)
        pid_i, started_f = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return process_alive(pid_i, started_f)


def close_stale_runs(tracking: TrackingConfig) -> list[str]:
    """Close as FAILED every RUNNING run of the experiment whose owner process is gone."""
    from tasks import store
    from tasks.tracking import client, fail_run

    c = client(tracking)
    eid = store.experiment_id(c, tracking.experiment)
    if eid is None:
        return []
    closed = []
    for run in store.running(c, eid):  # every one: a year of runs is far past one page
        tag = run.data.tags.get(names.OWNER)
        if tag and owner_alive(tag) is False:
            host, pid, _ = tag.rsplit(":", 2)
            fail_run(tracking, run.info.run_id,
                     f"closed by peft-bench: the process that ran it (pid {pid} on {host}) is "
                     "gone: killed, out of memory or its machine restarted. Resume it with "
                     "`peft-bench run --resume <parent run id>`")
            closed.append(run.info.run_id)
    return closed


def reopen(tracking: TrackingConfig, run_id: str) -> None:
    """Set a FAILED or stale run RUNNING again, owned by this process (a resume)."""
    from tasks.tracking import client

    c = client(tracking)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, names.OWNER, owner_tag())
    if names.ERROR in c.get_run(run_id).data.tags:  # the caller checked the id
        c.delete_tag(run_id, names.ERROR)


def sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def prepare_store(tracking: TrackingConfig) -> None:
    """Create (and migrate) a sqlite store once, under `<db>.lock`; other stores as they are."""
    uri = tracking.tracking_uri
    path = sqlite_path(uri)
    if path is None or uri in _prepared:
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    from tasks.config import ConfigError

    if not path.parent.is_dir():
        raise ConfigError(f"tracking.tracking_uri: folder {path.parent} does not exist")
    with FileLock(str(path) + ".lock", timeout=300):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _prepared.add(uri)
