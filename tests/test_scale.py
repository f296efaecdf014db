"""A year of nightly runs (#16): on a store of 5,000+ runs, built through the MLflow client
around a real benchmark, with 1,500 stale RUNNING runs, `close-stale` closes every stale run
(it stopped at 1,000) and leaves the live ones; the regression history, `compare`, the report
and `plan`'s estimate give the same answers as on the small store. Timings are in
benchmarks/big_store.py, not here."""
from __future__ import annotations

import pytest
from conftest import make_bench_config
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from benchmarks.big_store import fill
from flows.benchmark import benchmark
from flows.cli.main import app
from flows.orchestration.plan import history as plan_history
from tasks.analysis import regression
from tasks.common import names
from tasks.config.schema import BenchConfig, TrackingConfig
from tasks.report import generate_report
from tasks.tracking import store
from tasks.tracking.lifecycle import close_stale_runs
from tasks.tracking.owner import owner_tag

STALE, TOTAL = 1500, 5000


def answers(cfg: dict, parent: str, digest: str, out) -> dict:
    uri = cfg["tracking"]["tracking_uri"]
    client = MlflowClient(uri)
    shown = CliRunner().invoke(app, ["compare", "--parent", parent, "--tracking-uri", uri])
    assert shown.exit_code == 0, shown.output
    plan = plan_history(BenchConfig.model_validate(cfg), digest)
    return {"history": [r.info.run_id for r in regression.history(client, client.get_run(parent), 5)],
            "compare": shown.output,
            "report": generate_report(parent, uri, out).summary,
            "plan": {k: (round(e.per_step_s, 9), e.runs_seen) for k, e in plan.items()}}


@pytest.fixture(scope="module")
def year(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    tmp = tmp_path_factory.mktemp("scale")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["name"] = "nightly"
    cfg["methods"] = cfg["methods"][:2]
    cfg["training"].update(max_steps=2, eval_every=None)
    first = benchmark(config=cfg)
    second = benchmark(config=cfg)
    uri = cfg["tracking"]["tracking_uri"]
    client = MlflowClient(uri)
    parent = client.get_run(second["parent_run_id"])
    digest = parent.data.tags[names.DATA_DIGEST]
    small = answers(cfg, parent.info.run_id, digest, tmp / "small")
    eid = parent.info.experiment_id
    live = [client.create_run(eid, tags={names.OWNER: owner_tag()}).info.run_id for _ in range(3)]
    made = fill(client, eid, TOTAL, STALE, "nightly", parent.data.tags[names.CONFIG_HASH])
    return cfg, first["parent_run_id"], parent.info.run_id, digest, small, made, live, tmp


@pytest.mark.timeout(1800)
def test_the_store_is_a_year_of_nightly_runs(year):
    cfg, _, _, _, _, made, _, _ = year
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    eid = store.experiment_id(client, "ci")
    assert len(store.search(client, eid, store.Query())) >= TOTAL
    assert len(made["stale"]) == STALE


def test_answers_are_those_of_the_small_store(year):
    cfg, first, second, digest, small, _, _, tmp = year
    big = answers(cfg, second, digest, tmp / "big")
    assert small["history"] == [first]  # the check found the first nightly
    for key in small:
        assert big[key] == small[key], key


def test_close_stale_closes_every_stale_run_and_no_live_one(year):
    cfg, _, _, _, _, made, live, _ = year
    tracking = TrackingConfig(**cfg["tracking"])
    closed = close_stale_runs(tracking)
    assert sorted(closed) == sorted(made["stale"])
    client = MlflowClient(tracking.tracking_uri)
    eid = store.experiment_id(client, "ci")
    assert sorted(r.info.run_id for r in store.running(client, eid)) == sorted(live)
    assert close_stale_runs(tracking) == []
