"""`dispatch: deployments`: each method becomes its own flow run of the `finetune` deployment,
so a work pool with N workers trains N methods at once. Prefect's work pools do the spreading;
this module only starts the runs, waits for all of them, and cleans up after crashed ones.

A worker (or its host) that dies mid-run cannot report anything: its flow run would stay
RUNNING and the parent would wait for ever. Flow runs send heartbeat events (prefect.yaml sets
PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30); the server-side automation in
deploy/crash-zombie-flow-runs.yaml marks a run that stops sending them CRASHED. As a fallback
for servers without that automation, the parent does the same itself after `stale_after_s()`
seconds without a sign of life. Either way the parent then closes the method's MLflow run
FAILED, unless the run's own on_crashed hook could still do it.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Callable, Optional
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import get_current_settings
from prefect.states import Crashed

from flows.orchestration.jobs import Job, States
from tasks.config.build import public_dump
from tasks.config.schema import BenchConfig, ConfigError
from tasks.tracking import runs as tracking

POLL_S = 2.0
HEARTBEAT = "prefect.flow-run.heartbeat"
STALE_ENV = "PEFT_BENCH_STALE_AFTER_S"
ALIVE_STATES = (StateType.PENDING, StateType.RUNNING)  # a process should be behind these


def stale_after_s() -> Optional[float]:
    """Seconds without a heartbeat after which the parent declares a child dead: the
    PEFT_BENCH_STALE_AFTER_S environment variable (0 switches the check off), else four
    heartbeat periods, a little later than the server-side automation (three)."""
    if raw := os.environ.get(STALE_ENV, "").strip():
        value = float(raw)
        return value if value > 0 else None
    beat = get_current_settings().flows.heartbeat_frequency
    return 4.0 * beat if beat else None


def last_sign_of_life(client, run: FlowRun) -> datetime:
    """The run's latest heartbeat event, or when it entered its state if later (a PENDING run
    has not started its heartbeats yet)."""
    seen = run.state.timestamp
    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=seen),
        event=EventNameFilter(name=[HEARTBEAT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        order=EventOrder.DESC), limit=1)
    if page.events:
        seen = max(seen, page.events[0].occurred)
    return seen


def crash_if_stale(client, run: FlowRun, stale_after: Optional[float],
                   logger: logging.Logger | logging.LoggerAdapter) -> bool:
    """Mark a PENDING/RUNNING run CRASHED when nothing has been heard of it for `stale_after`
    seconds. True if it did."""
    if stale_after is None or run.state is None or run.state.type not in ALIVE_STATES:
        return False
    now = datetime.now(timezone.utc)
    if (now - run.state.timestamp).total_seconds() <= stale_after:
        return False  # cheap check first: no event query while the state is recent
    idle = (now - last_sign_of_life(client, run)).total_seconds()
    if idle <= stale_after:
        return False
    message = (f"no heartbeat for {idle:.0f} s (limit {stale_after:.0f} s) while "
               f"{run.state.name}: the worker or host running it is gone; marked crashed "
               "by the benchmark parent")
    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    logger.error("flow run %s (%s): %s", run.name, run.id, message)
    return True


def crash_in_process_children(parent_flow_run_id: UUID, why: str) -> list[str]:
    """Mark CRASHED the child flow runs that ran inside a crashed parent's process (`dispatch:
    local`) and are still PENDING/RUNNING: they send no heartbeats (flows/benchmark.py), so
    neither the server's automation nor a waiting parent would ever end them. Their names."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ALIVE_STATES)))))
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=f"its parent {why}"), force=True)
    return [run.name for run in runs]


def check_deployment(cfg: BenchConfig) -> None:
    """The finetune deployment must exist before the benchmark starts anything."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(cfg.finetune_deployment)
        except ObjectNotFound:
            raise ConfigError(f"finetune_deployment: no deployment {cfg.finetune_deployment!r} "
                              "on this Prefect server; deploy it with "
                              "`prefect deploy -n finetune`") from None


def wait_all(flow_run_ids: dict[str, UUID], stale_after: Optional[float] | str = "auto",
             logger: logging.Logger | logging.LoggerAdapter | None = None,
             on_final: Optional[Callable[[str, FlowRun], None]] = None) -> dict[str, FlowRun]:
    """Poll until every flow run is in a final state; returns name -> FlowRun. A run that
    stops sending heartbeats is marked CRASHED after `stale_after` seconds (default:
    `stale_after_s()`; None: never). `on_final(name, run)` is called once per run, as soon as
    it is seen final (the runs go on in parallel: a progress bar moves while others train)."""
    stale_after = stale_after_s() if stale_after == "auto" else stale_after
    logger = logger or get_logger(__name__)
    pending, done = dict(flow_run_ids), {}
    with get_client(sync_client=True) as client:
        while pending:
            for name, fid in list(pending.items()):
                run = client.read_flow_run(fid)
                if run.state is not None and run.state.is_final():
                    done[name] = run
                    del pending[name]
                    if on_final is not None:
                        on_final(name, run)
                else:  # a run marked CRASHED here is read back as such on the next round
                    crash_if_stale(client, run, stale_after, logger)
            if pending:
                time.sleep(POLL_S)
    return done


def run_deployments(cfg: BenchConfig, jobs: list[Job],
                    on_done: Optional[Callable[[Job, str], None]] = None) -> States:
    """Start one finetune flow run per job, all at once (in the jobs' order), wait for all,
    return their states; `on_done` hears of each as it ends."""
    logger = get_run_logger()
    config = public_dump(cfg)  # parameters are stored by Prefect: no credentials
    started = {}
    for job in jobs:
        run = run_deployment(cfg.finetune_deployment, timeout=0, as_subflow=True,
                             flow_run_name=job.flow_run_name(cfg.name),
                             parameters=job.parameters(config))
        logger.info("%s: flow run %s", job.key, run.id)
        started[job.key] = run.id
    by_key, states = {job.key: job for job in jobs}, {}

    def ended(key: str, run: FlowRun) -> None:
        if on_done is not None:
            on_done(by_key[key], run.state.type.value)

    for key, run in wait_all(started, logger=logger, on_final=ended).items():
        states[by_key[key]] = run.state.type.value
        if not run.state.is_completed():
            # A killed worker cannot close its MLflow run; the parent, still alive, does.
            why = f"flow run {run.state.name}: {run.state.message}"
            tracking.fail_open_runs(cfg.tracking, str(run.id), why)
            logger.error("%s: %s", key, why)
    return states
