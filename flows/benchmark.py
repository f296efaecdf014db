"""The benchmark flow: validate → prepare data once → one `finetune` child per (method, seed)
→ aggregates and the regression check → report.

Bad config or data fails here, before any model is loaded and before any MLflow run exists.
A failing run is recorded FAILED and the others go on; the report shows it as failed. With
`resume`, the flow takes up an earlier benchmark's parent run: finished runs are left alone,
the others continue from their last checkpoint in the same MLflow runs.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from transformers import AutoConfig

from flows.finetune import finetune, prefect_tags
from flows.orchestration import artifacts
from flows.orchestration.jobs import Job, States, final_jobs
from flows.orchestration.sweeping import run_grid
from tasks.common import names, progress
from tasks.common.secrets import redact
from tasks.conclude import conclude_task
from tasks.config.build import build_config, fingerprint, load_config, public_dump, revealed
from tasks.config.schema import BenchConfig, ConfigError
from tasks.data.dataset import DataSummary
from tasks.models.source import local_path
from tasks.preflight import check_heavy, check_light, resolve_device
from tasks.prepare import prepare_dataset
from tasks.report import generate_report_task
from tasks.tracking import outage
from tasks.tracking import runs as tracking
from tasks.tracking.lifecycle import close_stale_runs, reopen


def resolve_config(config_path: Optional[str] = None, overrides: Optional[list[str]] = None,
                   config: Optional[dict] = None, methods: Optional[list[str]] = None) -> BenchConfig:
    """The one way a flow gets its config: a YAML path, or a dict (a flow parameter), plus
    `key=value` overrides and an optional method selection."""
    if (config_path is None) == (config is None):
        raise ConfigError("give exactly one of config_path or config")
    if config_path is not None:
        cfg = load_config(config_path, overrides or [])
    else:
        cfg = build_config(dict(config), "config parameter", overrides or [])
    return cfg.select(methods) if methods else cfg


@task(name="validate", cache_policy=NO_CACHE)
def preflight(cfg: BenchConfig) -> DataSummary:
    """Everything that can be checked without loading model weights (tasks/config/preflight.py),
    then the runs that killed processes left RUNNING are closed."""
    summary = check_light(cfg)
    skipped = check_heavy(cfg)
    if skipped:
        get_run_logger().warning(skipped)
    if cfg.dispatch == "deployments":
        from flows.orchestration.dispatch import check_deployment
        check_deployment(cfg)
    for run_id in close_stale_runs(cfg.tracking):
        get_run_logger().warning("closed stale MLflow run %s (its process is gone)", run_id)
    return summary


def ensure_gpu_limit(cfg: BenchConfig) -> None:
    """Create (or resize) the global concurrency limit the finetune runs take a slot of."""
    if not cfg.concurrency.slot:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(cfg.concurrency.slot,
                                                        cfg.concurrency.limit)


def random_init(cfg: BenchConfig) -> bool:
    mc = AutoConfig.from_pretrained(local_path(cfg.model), revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    return bool(getattr(mc, "peft_bench_random_init", False))


def start_parent_run(cfg: BenchConfig, data_digest: str, source: str,
                     summary: DataSummary) -> str:
    params = {**tracking.flatten(public_dump(cfg)),
              "data.rows.train": str(summary.train_rows), "data.rows.eval": str(summary.eval_rows),
              **{f"versions.{k}": v for k, v in tracking.versions().items()}}
    tags = {names.ROLE: names.ROLE_PARENT, names.BENCHMARK: cfg.name,
            names.METHODS: ",".join(m.name for m in cfg.methods), names.REFERENCE: cfg.reference,
            names.CONFIG_HASH: fingerprint(cfg),
            names.RANDOM_INIT: str(random_init(cfg)).lower(),
            names.GIT_SHA: tracking.git_sha(), names.DEVICE: str(resolve_device(cfg.training)),
            names.DATA_DIGEST: data_digest, names.DATA_SOURCE: source, **prefect_tags()}
    return tracking.open_run(cfg, tags, run_name=cfg.name, params=params)


def planned_total_steps(cfg: BenchConfig, train_rows: int) -> int:
    from flows.orchestration.plan import planned_steps

    grid = sum(planned_steps(cfg, train_rows, point) for _, point in cfg.grid_jobs())
    return grid + planned_steps(cfg, train_rows) * len(cfg.runs())


def resume_parent(cfg: BenchConfig, parent_run_id: str) -> str:
    """Take up an earlier benchmark's parent run: same config fingerprint, reopened RUNNING."""
    run = tracking.client(cfg.tracking).get_run(parent_run_id)
    if run.data.tags.get(names.ROLE) != names.ROLE_PARENT:
        raise ConfigError(f"resume: run {parent_run_id} is not a benchmark parent run")
    theirs, ours = run.data.tags.get(names.CONFIG_HASH), fingerprint(cfg)
    if theirs != ours:
        raise ConfigError(f"resume: run {parent_run_id} measured another config (fingerprint "
                          f"{theirs}, this one {ours}); only seeds, dispatch and outputs may "
                          "change on a resume")
    reopen(cfg.tracking, parent_run_id)
    return parent_run_id


def run_local(cfg: BenchConfig, jobs: list[Job],
              on_done: Optional[artifacts.OnDone] = None) -> States:
    """Each job as an in-process child flow run, one after another, in the jobs' order (for
    final runs the method order rotates from one seed to the next); `on_done` hears of each
    as it ends."""
    from prefect.settings import temporary_settings

    states, config = {}, public_dump(cfg)
    # No heartbeats for in-process child runs: this process is their only runner (if it dies,
    # they die with it), and each heartbeat thread costs up to 1 s to join at the end of a run.
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        for job in jobs:
            run = finetune.with_options(flow_run_name=job.flow_run_name(cfg.name))
            state = run(**job.parameters(config), return_state=True)
            states[job] = state.type.value
            if on_done is not None:
                on_done(job, states[job])
            if not state.is_completed():
                get_run_logger().error("%s failed: %s", job.key, state.message)
                error = state.result(raise_on_failure=False)
                if isinstance(error, BaseException) and (down := outage.lost(cfg.tracking, error)):
                    raise down  # the store is gone: the next jobs could not log either
    return states


def dispatcher(cfg: BenchConfig):
    if cfg.dispatch == "deployments":
        from flows.orchestration.dispatch import run_deployments
        return run_deployments
    return run_local


def run_all(cfg: BenchConfig, parent: str, on_done: artifacts.OnDone) -> States:
    """The sweep's grid (if any), then the final runs; the states of all, each told to
    `on_done` as it ends."""
    dispatch, chosen, states = partial(dispatcher(cfg), on_done=on_done), None, {}
    if cfg.sweep is not None:
        client = tracking.client(cfg.tracking)
        grid_states, chosen = run_grid(cfg, client, client.get_run(parent), dispatch)
        states.update(grid_states)
        for name, point in chosen.items():
            if point is None:  # no final runs to make: each counts as failed
                for job in (Job(name, s, parent) for s in cfg.training.run_seeds):
                    states[job] = "FAILED"
                    on_done(job, "FAILED")
    states.update(dispatch(cfg, final_jobs(cfg, parent, chosen)))
    return states


def failed_tags(finals: States) -> dict[str, str]:
    failed = [job for job, s in finals.items() if s != "COMPLETED"]
    return {names.FAILED_METHODS: ",".join(sorted({job.method for job in failed})),
            names.FAILED_RUNS: ",".join(sorted(job.key for job in failed))}


class AllRunsFailed(RuntimeError):
    """No (method, seed) run finished: nothing was measured, so the benchmark failed."""


class RegressionError(RuntimeError):
    """`regression.fail_on_regression` and a flag: the flow run ends FAILED, the report and
    every MLflow run are written first. `result` is what the flow would have returned."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def fail_mlflow_runs(flow, flow_run, state) -> None:
    """on_crashed/on_cancellation hook: a benchmark whose process was killed (OOM killer,
    `kill -9`, cancellation) must not leave its MLflow runs RUNNING: its parent run and, with
    `dispatch: local`, the child run of the method it was training. The worker runs it, with
    keyword arguments, when the flow-run process is gone. The in-process child flow runs it
    leaves PENDING/RUNNING are marked CRASHED in Prefect too."""
    from flows.orchestration.dispatch import crash_in_process_children

    p = flow_run.parameters
    cfg = revealed(resolve_config(p.get("config_path"), p.get("overrides"), p.get("config"),
                                  p.get("methods")))
    why = f"flow run {state.name}: {state.message}"
    for parent in tracking.fail_open_runs(cfg.tracking, str(flow_run.id), why):
        tracking.fail_open_children(cfg.tracking, parent, why)
    crash_in_process_children(flow_run.id, why)


@flow(name="benchmark", log_prints=True, on_crashed=[fail_mlflow_runs],
      on_cancellation=[fail_mlflow_runs])
def benchmark(config_path: Optional[str] = None, overrides: Optional[list[str]] = None,
              config: Optional[dict] = None, methods: Optional[list[str]] = None,
              resume: Optional[str] = None, prechecked: bool = False) -> dict[str, Any]:
    """`prechecked`: the caller (the CLI) ran the same checks a moment ago in this process;
    only the data summary is taken again, not the model targets and the store."""
    cfg = revealed(resolve_config(config_path, overrides, config, methods))
    if not prechecked:
        preflight(cfg)
    data = prepare_dataset(cfg.data, cfg.model.name_or_path, cfg.model.revision)
    summary = data.summary
    if resume:
        parent = resume_parent(cfg, resume)
    else:
        parent = start_parent_run(cfg, data.digest, redact(data.source), summary)
    logger = get_run_logger()
    grid = f" + {len(cfg.grid_jobs())} grid points" if cfg.sweep else ""
    progress.say(f"benchmark {cfg.name}: MLflow parent run {parent}{' (resumed)' if resume else ''}"
                 f" in {redact(cfg.tracking.tracking_uri)}: {len(cfg.methods)} method(s) x "
                 f"{len(cfg.training.run_seeds)} seed(s){grid}")
    if cfg.dispatch == "local":
        progress.start_overall(planned_total_steps(cfg, summary.train_rows),
                               len(cfg.grid_jobs()) + len(cfg.runs()))
    runs_progress = artifacts.Progress.start(cfg.name, len(cfg.grid_jobs()) + len(cfg.runs()))
    with tracking.closing_run(cfg.tracking, parent):
        tracking.log_config(parent, cfg)
        ensure_gpu_limit(cfg)
        states = run_all(cfg, parent, runs_progress.finished)
        finals = {job: s for job, s in states.items() if job.is_final}
        tags = failed_tags(finals)
        tracking.set_tags(parent, cfg.tracking, tags)
        all_failed = bool(finals) and all(s != "COMPLETED" for s in finals.values())
        check = conclude_task(cfg, parent)
        artifacts.publish_results(cfg.name, cfg.tracking, parent)
        progress.close_overall()
        report = generate_report_task(parent, cfg.tracking.tracking_uri, Path(cfg.report.output_dir))
        if all_failed:  # the parent is FAILED too, after the report says why
            raise AllRunsFailed(f"every run failed: {tags[names.FAILED_RUNS]}")
    logger.info("report: %s", report.html_path)
    result = {"parent_run_id": parent, "states": {job.key: s for job, s in states.items()},
              "failed": [k for k in tags[names.FAILED_RUNS].split(",") if k],
              "regressions": [f.message for f in check.flags] if check else [],
              "report_html": str(report.html_path), "report_md": str(report.markdown_path),
              "tracking_uri": redact(cfg.tracking.tracking_uri), "train_rows": summary.train_rows,
              "eval_rows": summary.eval_rows}
    if check and check.flags and cfg.regression.fail_on_regression:
        raise RegressionError("regression.fail_on_regression: " + "; ".join(result["regressions"]),
                              result)
    return result
