"""A sweep's first phase: every grid point trained under the first seed and scored on the
selection split, as a child run of its method's run; then the choice of each method's best
point, which the final runs use under every seed on the test split.

Selection reads only the grid runs' `eval/*` metrics, which come from the selection split
(`data.eval_split`): a grid run never evaluates on the test split, so nothing of it can leak
into the choice. With `sweep.strategy: halving | tpe` the grid runs go through Optuna
(flows/orchestration/trials.py); a pruned point (FINISHED, tagged `peft_bench.pruned_at_step`)
is scored on fewer steps than the others, so it is never chosen while a point that trained to
the end finished; only when none did is the best pruned point chosen.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

from mlflow import MlflowClient
from mlflow.entities import Run

from flows.orchestration import trials
from flows.orchestration.jobs import Job, States, grid_jobs
from tasks.common import names
from tasks.config.schema import BenchConfig
from tasks.config.sweep import better
from tasks.tracking import runs as tracking
from tasks.tracking import store
from tasks.tracking.owner import owner_tag

Dispatch = Callable[[BenchConfig, list[Job]], States]


def open_method_runs(cfg: BenchConfig, client: MlflowClient, parent: Run) -> dict[str, str]:
    """One run per method (the aggregate run of tasks/analysis/aggregate.py, opened early), the parent
    of its grid points; an earlier benchmark's are taken up again on a resume."""
    existing = store.aggregates_by_method(client, parent.info.experiment_id, parent.info.run_id)
    out = {}
    for m in cfg.methods:
        tags = {names.ROLE: names.ROLE_AGGREGATE, names.METHOD: m.name,
                names.METHOD_KIND: m.method, names.BENCHMARK: cfg.name,
                names.BENCHMARK_RUN: parent.info.run_id, names.OWNER: owner_tag(),
                names.CONFIG_HASH: parent.data.tags.get(names.CONFIG_HASH, "")}
        if m.name in existing:
            out[m.name] = existing[m.name]
            client.update_run(out[m.name], status="RUNNING")
            client.set_tag(out[m.name], names.OWNER, tags[names.OWNER])
        else:
            out[m.name] = tracking.new_run(client, parent.info.experiment_id,
                                           f"{m.name} [{cfg.name}]", tags, owner=tags[names.OWNER])
    return out


def grid_runs(client: MlflowClient, experiment_id: str, method_run_id: str) -> list[Run]:
    return store.children(client, experiment_id, method_run_id, tags={names.ROLE: names.ROLE_GRID})


def choose(cfg: BenchConfig, runs: list[Run]) -> Optional[Run]:
    """The FINISHED grid run with the best selection metric (the first of equals, in grid
    order, else in start order), pruned runs only when no other finished; None when none
    finished."""
    metric = names.CHILD_METRICS[cfg.sweep.metric]
    order = {json.dumps(p, sort_keys=True): i for i, (_, p) in enumerate(cfg.grid_jobs())}
    done = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    done = [r for r in done if names.PRUNED_AT_STEP not in r.data.tags] or done
    done.sort(key=lambda r: (order.get(_point_key(r), len(order)), r.info.start_time))
    best = None
    for run in done:
        if best is None or better(run.data.metrics[metric], best.data.metrics[metric],
                                  cfg.sweep.higher_is_better):
            best = run
    return best


def _point_key(run: Run) -> str:
    return json.dumps(json.loads(run.data.tags.get(names.POINT_JSON, "{}")), sort_keys=True)


def run_grid(cfg: BenchConfig, client: MlflowClient, parent: Run,
             dispatch: Dispatch) -> tuple[States, dict[str, Optional[dict]]]:
    """Train every grid point, then tag each method's chosen point. Returns the grid runs'
    states and method -> chosen point (None when every point of the method failed)."""
    method_runs = open_method_runs(cfg, client, parent)
    if cfg.sweep.strategy == "grid":
        states = dispatch(cfg, grid_jobs(cfg, method_runs))
    else:
        states = trials.run_studies(cfg, client, parent.info.experiment_id, method_runs, dispatch)
    chosen: dict[str, Optional[dict]] = {}
    for name, run_id in method_runs.items():
        runs = grid_runs(client, parent.info.experiment_id, run_id)
        best = choose(cfg, [r for r in runs if r.data.tags.get(names.METHOD) == name])
        chosen[name] = None if best is None else json.loads(best.data.tags[names.POINT_JSON])
        for r in runs:
            client.set_tag(r.info.run_id, names.CHOSEN, str(best is not None and
                                                            r.info.run_id == best.info.run_id).lower())
        client.set_tag(run_id, names.CHOSEN_POINT, json.dumps(chosen[name]))
    return states, chosen
