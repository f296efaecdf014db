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

from pathlib import Path
from typing import Optional

from tasks.common import names
from tasks.config.schema import TrackingConfig
from tasks.tracking import store
from tasks.tracking.owner import owner_alive, owner_tag
from tasks.tracking.runs import client, fail_run

_prepared: set[str] = set()


def close_stale_runs(tracking: TrackingConfig) -> list[str]:
    """Close as FAILED every RUNNING run of the experiment whose owner process is gone."""

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

    from tasks.config.schema import ConfigError

    if not path.parent.is_dir():
        raise ConfigError(f"tracking.tracking_uri: folder {path.parent} does not exist")
    with FileLock(str(path) + ".lock", timeout=300):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _prepared.add(uri)
