"""After every (method, seed) run: the per-method aggregate runs, then the regression alarm.

The alarm's flags land in four places, so that whoever watches one of them sees it:
the parent run's `peft_bench.regressions` tag (JSON, which the report reads), the report's
first section, a Prefect markdown artifact (`peft-bench-regressions`) and a Prefect event
(`peft-bench.regression.detected`, resource `peft-bench.benchmark.<name>`) that an automation
can turn into a notification (deploy/notify-on-regression.yaml).
"""
from __future__ import annotations

from typing import Optional

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.analysis import aggregate, regression
from tasks.common import names
from tasks.config.schema import BenchConfig
from tasks.tracking import runs


def publish(cfg: BenchConfig, parent_run_id: str, check: regression.Check,
            client: MlflowClient) -> None:
    client.set_tag(parent_run_id, names.REGRESSIONS, check.to_json())
    client.set_tag(parent_run_id, names.REGRESSION_BASELINES, ",".join(check.baselines)[:5000])
    text = regression.markdown(check, cfg.name)
    if check.baselines:
        create_markdown_artifact(markdown=text, key=names.PREFECT_REGRESSION_KEY,
                                 description=f"peft-bench regression check of {parent_run_id}")
    if check.flags:
        emit_event(event=names.REGRESSION_EVENT,
                   resource={"prefect.resource.id": f"peft-bench.benchmark.{cfg.name}",
                             "prefect.resource.name": cfg.name},
                   payload={"parent_run_id": parent_run_id, "markdown": text,
                            "flags": [f.message for f in check.flags],
                            "baselines": check.baselines})


def conclude(cfg: BenchConfig, parent_run_id: str) -> Optional[regression.Check]:
    """Aggregate the children into one run per method; check for regressions (if enabled)."""
    client = runs.client(cfg.tracking)
    parent = client.get_run(parent_run_id)
    summary = aggregate.summarize(client, parent)
    aggregate.log_aggregates(client, summary)
    if not cfg.regression.enabled:
        return None
    baselines = regression.history(client, parent, cfg.regression.window)
    check = regression.check_against(client, summary, baselines, cfg.regression)
    publish(cfg, parent_run_id, check, client)
    logger = get_run_logger()
    for flag in check.flags:
        logger.warning("REGRESSION %s", flag.message)
    return check


@task(name="aggregate-and-check", cache_policy=NO_CACHE)
def conclude_task(cfg: BenchConfig, parent_run_id: str) -> Optional[regression.Check]:
    return conclude(cfg, parent_run_id)
