"""The benchmark flow: validate → prepare data once → one `finetune` child per method → report.

Bad config or data fails here, before any model is loaded and before any MLflow run exists.
A failing method is recorded FAILED and the others go on; the report shows it as failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from transformers import AutoConfig

from flows.finetune import finetune, prefect_tags
from tasks import tracking
from tasks.config import BenchConfig, ConfigError, build_config, load_config
from tasks.data import DataSummary, prepare_dataset, validate_data
from tasks.model import check_model_source, resolve_device
from tasks.report import generate_report_task


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
    """Everything that can be checked without loading a model."""
    resolve_device(cfg.training)
    check_model_source(cfg.model)
    summary = validate_data(cfg.data)
    tracking.check_reachable(cfg.tracking)
    if cfg.dispatch == "deployments":
        from flows.dispatch import check_deployment
        check_deployment(cfg)
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
    mc = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    return bool(getattr(mc, "peft_bench_random_init", False))


def start_parent_run(cfg: BenchConfig, data_digest: str, source: str) -> str:
    params = {**tracking.flatten(cfg.model_dump(mode="json")),
              **{f"versions.{k}": v for k, v in tracking.versions().items()}}
    tags = {"peft_bench.role": "parent", "peft_bench.benchmark": cfg.name,
            "peft_bench.random_init": str(random_init(cfg)).lower(),
            "peft_bench.git_sha": tracking.git_sha(),
            "peft_bench.device": str(resolve_device(cfg.training)),
            "peft_bench.data_digest": data_digest, "peft_bench.data_source": source,
            **prefect_tags()}
    return tracking.create_run(cfg, tags, run_name=cfg.name, params=params)


def run_local(cfg: BenchConfig, parent_run_id: str) -> dict[str, str]:
    """Each method as an in-process child flow run, one after another."""
    states = {}
    for m in cfg.methods:
        state = finetune(config=cfg.model_dump(mode="json"), method_name=m.name,
                         parent_run_id=parent_run_id, return_state=True)
        states[m.name] = state.type.value
        if not state.is_completed():
            get_run_logger().error("method %s failed: %s", m.name, state.message)
    return states


def fail_mlflow_runs(flow, flow_run, state) -> None:
    """on_crashed/on_cancellation hook: a benchmark whose process was killed (OOM killer,
    `kill -9`, cancellation) must not leave its MLflow runs RUNNING: its parent run and, with
    `dispatch: local`, the child run of the method it was training. The worker runs it, with
    keyword arguments, when the flow-run process is gone."""
    p = flow_run.parameters
    cfg = resolve_config(p.get("config_path"), p.get("overrides"), p.get("config"),
                         p.get("methods"))
    why = f"flow run {state.name}: {state.message}"
    for parent in tracking.fail_open_runs(cfg.tracking, str(flow_run.id), why):
        tracking.fail_open_children(cfg.tracking, parent, why)


@flow(name="benchmark", log_prints=True, on_crashed=[fail_mlflow_runs],
      on_cancellation=[fail_mlflow_runs])
def benchmark(config_path: Optional[str] = None, overrides: Optional[list[str]] = None,
              config: Optional[dict] = None, methods: Optional[list[str]] = None) -> dict[str, Any]:
    cfg = resolve_config(config_path, overrides, config, methods)
    summary = preflight(cfg)
    data = prepare_dataset(cfg.data, cfg.model.name_or_path, cfg.model.revision)
    parent = start_parent_run(cfg, data.digest, data.source)
    logger = get_run_logger()
    logger.info("MLflow parent run %s (%s)", parent, cfg.tracking.tracking_uri)
    with tracking.closing_run(cfg.tracking, parent):
        tracking.log_config(parent, cfg)
        ensure_gpu_limit(cfg)
        if cfg.dispatch == "deployments":
            from flows.dispatch import run_deployments
            states = run_deployments(cfg, parent)
        else:
            states = run_local(cfg, parent)
        failed = sorted(n for n, s in states.items() if s != "COMPLETED")
        tracking.set_tags(parent, cfg.tracking, {"peft_bench.failed_methods": ",".join(failed)})
        report = generate_report_task(parent, cfg.tracking.tracking_uri, Path(cfg.report.output_dir))
    logger.info("report: %s", report.html_path)
    return {"parent_run_id": parent, "states": states, "failed": failed,
            "report_html": str(report.html_path), "report_md": str(report.markdown_path),
            "tracking_uri": cfg.tracking.tracking_uri, "train_rows": summary.train_rows,
            "eval_rows": summary.eval_rows}

