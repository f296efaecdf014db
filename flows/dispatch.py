"""`dispatch: deployments`: each method becomes its own flow run of the `finetune` deployment,
so a work pool with N workers trains N methods at once. Prefect's work pools do the spreading;
this module only starts the runs, waits for all of them, and cleans up after crashed ones.
"""
from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from tasks import tracking
from tasks.config import BenchConfig, ConfigError

POLL_S = 2.0


def check_deployment(cfg: BenchConfig) -> None:
    """The finetune deployment must exist before the benchmark starts anything."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(cfg.finetune_deployment)
        except ObjectNotFound:
            raise ConfigError(f"finetune_deployment: no deployment {cfg.finetune_deployment!r} "
                              "on this Prefect server; deploy it with "
                              "`prefect deploy -n finetune`") from None


def wait_all(flow_run_ids: dict[str, UUID]) -> dict[str, object]:
    """Poll until every flow run is in a final state; returns name -> FlowRun."""
    pending, done = dict(flow_run_ids), {}
    with get_client(sync_client=True) as client:
        while pending:
            for name, fid in list(pending.items()):
                run = client.read_flow_run(fid)
                if run.state is not None and run.state.is_final():
                    done[name] = run
                    del pending[name]
            if pending:
                time.sleep(POLL_S)
    return done


def run_deployments(cfg: BenchConfig, parent_run_id: str) -> dict[str, str]:
    """Start one finetune flow run per method (all at once), wait for all, return states."""
    logger = get_run_logger()
    config = cfg.model_dump(mode="json")
    started = {}
    for m in cfg.methods:
        run = run_deployment(cfg.finetune_deployment, timeout=0, as_subflow=True,
                             flow_run_name=f"{cfg.name}-{m.name}",
                             parameters={"config": config, "method_name": m.name,
                                         "parent_run_id": parent_run_id})
        logger.info("method %s: flow run %s", m.name, run.id)
        started[m.name] = run.id
    states = {}
    for name, run in wait_all(started).items():
        states[name] = run.state.type.value
        if not run.state.is_completed():
            # A killed worker cannot close its MLflow run; the parent, still alive, does.
            why = f"flow run {run.state.name}: {run.state.message}"
            tracking.fail_open_runs(cfg.tracking, str(run.id), why)
            logger.error("method %s: %s", name, why)
    return states
