"""The benchmark's Prefect artifacts (flows/orchestration/artifacts.py), read back through the
Prefect API of the session's test server: the results table against MLflow's aggregate runs
and hand-computed numbers, the progress artifact's every update (Prefect keeps only the latest
value; each update is a `prefect.artifact.updated` event, read back here), the history of one
benchmark name across two runs, the dispatch hook of `dispatch: deployments`, and a failed
artifact that leaves the benchmark going."""
from __future__ import annotations

import math
import re
import statistics
import threading
import time
from uuid import UUID

import pytest
from conftest import ceiling, make_bench_config
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Completed, Crashed, Failed, Running
from scipy import stats

from flows.benchmark import benchmark
from flows.orchestration import artifacts, dispatch

NAME = "Artifacts CI/nightly"  # slugified into the keys: "artifacts-ci-nightly"
COLUMNS = ["method", "kind", "seeds", "accuracy (mean)", "accuracy 95% CI",
           "train time s", "peak memory MB", "vs reference"]
KEY = re.compile(r"^[a-z0-9-]+$")  # Prefect's rule for artifact keys


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    """One benchmark of 3 methods x 2 seeds (one method diverges under both seeds), then the
    same benchmark name again with one method and one seed."""
    tmp = tmp_path_factory.mktemp("artifacts")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["name"] = NAME
    cfg["methods"] = [cfg["methods"][0], cfg["methods"][1],  # full, lora
                      {"name": "broken", "method": "full", "lr": 1.0e6}]
    cfg["training"].update(max_steps=3, eval_every=None, seeds=[1, 2])
    first = benchmark(config=cfg)
    second = benchmark(config=cfg, methods=["lora"], overrides=["training.seeds=[1]"])
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    return cfg, first, second, client


def flow_run_of(client: MlflowClient, result: dict) -> UUID:
    return UUID(client.get_run(result["parent_run_id"]).data.tags["prefect.flow_run_id"])


def artifacts_of(flow_run_id: UUID, kind: str) -> list:
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            type=ArtifactFilterType(any_=[kind])))


def artifacts_keyed(key: str) -> list:
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                sort=ArtifactSort.CREATED_DESC)


def table_of(artifact) -> list[dict]:
    import json

    return json.loads(artifact.data)  # a table artifact's data is its rows as JSON


def children(client: MlflowClient, result: dict) -> dict[str, dict[int, object]]:
    """method -> seed -> child run, read with MLflow's own client."""
    parent = client.get_run(result["parent_run_id"])
    found = client.search_runs([parent.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    out: dict[str, dict[int, object]] = {}
    for r in found:
        out.setdefault(r.data.tags["peft_bench.method"], {})[int(r.data.tags["peft_bench.seed"])] = r
    return out


def aggregates(client: MlflowClient, result: dict) -> dict[str, object]:
    parent = client.get_run(result["parent_run_id"])
    found = client.search_runs([parent.info.experiment_id],
                               "tags.peft_bench.role = 'aggregate' and "
                               f"tags.peft_bench.benchmark_run = '{parent.info.run_id}'")
    return {r.data.tags["peft_bench.method"]: r for r in found}


def t95(values: list[float], lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """scipy's Student-t 95% interval of the mean, clipped to [lo, hi]; a point if no spread."""
    mean, sem = statistics.fmean(values), stats.sem(values)
    if sem == 0:
        return mean, mean
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
    return max(lo, low), min(hi, high)


# ---------------------------------------------------------------- the results table

def test_results_table_matches_mlflow(runs):
    cfg, first, _, client = runs
    [table] = artifacts_of(flow_run_of(client, first), "table")
    rows = table_of(table)
    assert [r["method"] for r in rows] == ["full", "lora", "broken"]  # the config's order
    assert all(list(r) == COLUMNS for r in rows)
    kids, aggs = children(client, first), aggregates(client, first)
    acc = {m: [kids[m][s].data.metrics["eval/accuracy"] for s in (1, 2)] for m in ("full", "lora")}
    for row in rows[:2]:
        m, metrics = row["method"], aggs[row["method"]].data.metrics
        assert row["kind"] == m and row["seeds"] == "2 of 2"
        hand = statistics.fmean(acc[m])  # by hand from the child runs, and MLflow's aggregate
        assert abs(row["accuracy (mean)"] - hand) <= 5e-5
        assert abs(row["accuracy (mean)"] - metrics["accuracy_mean"]) <= 5e-5
        low, high = t95(acc[m], 0.0, 1.0)
        assert row["accuracy 95% CI"] == f"[{low:.4f}, {high:.4f}]"
        assert row["accuracy 95% CI"] == (f"[{metrics['accuracy_ci_low']:.4f}, "
                                          f"{metrics['accuracy_ci_high']:.4f}]")
        # Time and memory as the aggregate runs hold them (their kind of mean is theirs to say).
        assert row["train time s"] == round(metrics["train_time_s_mean"], 1)
        assert row["peak memory MB"] == round(metrics["peak_memory_mb_mean"], 0)
    assert rows[0]["vs reference"] == "reference"
    diffs = [b - a for a, b in zip(acc["full"], acc["lora"])]  # paired by seed
    low, high = t95(diffs)
    sig = "significant" if low > 0 or high < 0 else "not significant"
    d = 100 * statistics.fmean(diffs)
    assert rows[1]["vs reference"] == (f"{d:+.1f} pt [{100 * low:+.1f}, {100 * high:+.1f}] "
                                       f"vs full, {sig}")
    assert rows[2] == {"method": "broken", "kind": "full", "seeds": "0 of 2",
                       "accuracy (mean)": None, "accuracy 95% CI": "—",
                       "train time s": None, "peak memory MB": None,
                       "vs reference": "did not finish"}
    assert first["parent_run_id"] in table.description


# ---------------------------------------------------------------- the progress artifact

def events_of(artifact_id: UUID, want_updates: int) -> tuple[list, list]:
    """The artifact's created and updated events, oldest first, once `want_updates` updates
    (or more) have reached the server: the client emits them in the background."""
    deadline = time.monotonic() + ceiling(60)
    with get_client(sync_client=True) as c:
        while True:
            page = c.read_events(EventFilter(
                event=EventNameFilter(name=["prefect.artifact.created",
                                            "prefect.artifact.updated"]),
                resource=EventResourceFilter(id=[f"prefect.artifact.{artifact_id}"])), limit=50)
            events = sorted(page.events, key=lambda e: e.occurred)
            updates = [e for e in events if e.event == "prefect.artifact.updated"]
            if len(updates) >= want_updates or time.monotonic() > deadline:
                return [e for e in events if e.event == "prefect.artifact.created"], updates
            time.sleep(0.5)


def test_progress_ends_at_100_after_one_update_per_run(runs):
    _, first, _, client = runs
    [progress] = artifacts_of(flow_run_of(client, first), "progress")
    assert progress.data == 100
    assert progress.description.startswith(
        f"{NAME}: 6 of 6 runs done, 2 failed (broken/seed=1, broken/seed=2); finished in ")
    created, updates = events_of(progress.id, 6)
    assert [e.payload["description"] for e in created] == [f"{NAME}: 0 of 6 runs done; ETA unknown"]
    assert len(updates) == 6, [u.payload for u in updates]
    assert [u.payload["data"] for u in updates] == pytest.approx([100 * k / 6 for k in range(1, 7)])
    lasts = []
    for k, u in enumerate(updates, 1):
        text = u.payload["description"]
        assert text.startswith(f"{NAME}: {k} of 6 runs done"), text
        assert ("; ETA " in text and "elapsed" in text) if k < 6 else "; finished in " in text
        lasts.append(text.split("; last: ")[1])
    ran = {f"{m}/seed={s} {'FAILED' if m == 'broken' else 'COMPLETED'}"
           for m in ("full", "lora", "broken") for s in (1, 2)}
    assert sorted(lasts) == sorted(ran)  # each run told once, as it ended


def test_a_sweep_tells_its_grid_points_and_the_finals_it_cannot_run(prefect_harness, tmp_path,
                                                                    tiny_model_dir, sst2_dir):
    """Every grid point is a run; a method whose every point failed has no final runs to make,
    and each of those counts as a failed run, so the bar still ends at 100 %."""
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["name"] = "artifacts-sweep"
    cfg["methods"] = [cfg["methods"][1], {"name": "broken", "method": "full",
                                          "sweep": {"lr": [1.0e6]}}]  # lora, then one that diverges
    cfg["data"].update(test_split="test", test_size=64)
    cfg["training"].update(max_steps=3, eval_every=None, seeds=[1])
    cfg["sweep"] = {"grid": {"lr": [1e-3]}}
    result = benchmark(config=cfg)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    [progress] = artifacts_of(flow_run_of(client, result), "progress")
    assert progress.data == 100
    assert progress.description.startswith("artifacts-sweep: 4 of 4 runs done, 2 failed (")
    _, updates = events_of(progress.id, 4)
    lasts = [u.payload["description"].split("; last: ")[1] for u in updates]
    assert len(lasts) == 4, lasts
    assert lasts[0].startswith("grid:lora/seed=1/") and lasts[0].endswith(" COMPLETED")
    assert lasts[1].startswith("grid:broken/seed=1/") and lasts[1].endswith(" FAILED")
    assert lasts[2:] == ["broken/seed=1 FAILED", "lora/seed=1 COMPLETED"]
    assert [u.payload["data"] for u in updates] == pytest.approx([25, 50, 75, 100])


# ---------------------------------------------------------------- one key per benchmark name

def test_one_key_per_benchmark_name_keeps_the_history(runs):
    _, first, second, client = runs
    for kind, prefix in (("table", "peft-bench-results-"), ("progress", "peft-bench-progress-")):
        [a] = artifacts_of(flow_run_of(client, first), kind)
        [b] = artifacts_of(flow_run_of(client, second), kind)
        assert a.key == b.key and a.id != b.id
        assert KEY.match(a.key) and a.key.startswith(prefix + "artifacts-ci-nightly-"), a.key
        assert [x.id for x in artifacts_keyed(a.key)] == [b.id, a.id]  # newest first
    [table] = artifacts_of(flow_run_of(client, second), "table")
    [row] = table_of(table)
    assert row["method"] == "lora" and row["seeds"] == "1 of 1"
    assert row["accuracy 95% CI"] == "—" and row["vs reference"] == "reference"
    [progress] = artifacts_of(flow_run_of(client, second), "progress")
    assert progress.data == 100 and f"{NAME}: 1 of 1 runs done; finished in" in progress.description


def test_keys_are_allowed_stable_and_apart():
    a = artifacts.artifact_key("peft-bench-results-", "CI nightly")
    b = artifacts.artifact_key("peft-bench-results-", "ci-nightly")
    assert a != b and a.startswith("peft-bench-results-ci-nightly-")
    assert b.startswith("peft-bench-results-ci-nightly-")
    assert a == artifacts.artifact_key("peft-bench-results-", "CI nightly")
    for name in ("Über/straße — 東京", "🙂", "x" * 300, "a_b.c d"):
        key = artifacts.artifact_key("peft-bench-progress-", name)
        assert KEY.match(key) and len(key) <= 80, key


# ---------------------------------------------------------------- `dispatch: deployments`

@flow(name="artifacts-dispatch-probe")
def probe() -> None:
    """Only a flow to create flow runs of; never run."""


def test_wait_all_tells_each_run_as_it_ends(prefect_harness):
    """Three real flow runs, RUNNING; each is ended only once the hook has heard of the one
    before, so a hook called at the end (or twice, or not at all) fails here."""
    heard: list[tuple[str, str]] = []
    told = {name: threading.Event() for name in "abc"}
    with get_client(sync_client=True) as c:
        ids = {name: c.create_flow_run(probe, name=f"probe-{name}", state=Running()).id
               for name in "abc"}

    def on_final(name, run):
        heard.append((name, run.state.type.value))
        told[name].set()

    late: list[str] = []  # runs the hook had not heard of before the next one was ended

    def end_one_by_one():
        with get_client(sync_client=True) as c:
            for name, state in zip("abc", (Completed(), Failed(message="x"), Crashed(message="y"))):
                c.set_flow_run_state(ids[name], state, force=True)
                if not told[name].wait(ceiling(15)):
                    late.append(name)  # and end the others anyway: wait_all must return

    ender = threading.Thread(target=end_one_by_one, daemon=True)
    ender.start()
    try:
        done = dispatch.wait_all(ids, stale_after=None, on_final=on_final)
    finally:
        ender.join(ceiling(60))
        with get_client(sync_client=True) as c:  # nothing left RUNNING on the shared server
            for run in c.read_flow_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=list(ids.values())))):
                if not run.state.is_final():
                    c.set_flow_run_state(run.id, Crashed(message="test teardown"), force=True)
    assert not late, f"the hook heard of {late} only after the next run had ended"
    assert heard == [("a", "COMPLETED"), ("b", "FAILED"), ("c", "CRASHED")]
    assert {k: r.state.type.value for k, r in done.items()} == dict(heard)


# ---------------------------------------------------------------- a failed artifact

@flow(name="artifacts-failure-probe")
def failing_artifacts(tracking_uri: str) -> bool:
    """A progress artifact deleted under the tracker's feet and a results table of a parent
    run the store does not hold: both are warnings, the flow goes on."""
    from flows.orchestration.jobs import Job
    from tasks.config.schema import TrackingConfig

    progress = artifacts.Progress.start("artifact-failure", 2)
    with get_client(sync_client=True) as c:
        c.delete_artifact(progress.artifact_id)
    progress.finished(Job("lora", 1, "parent"), "COMPLETED")
    table = artifacts.publish_results("artifact-failure",
                                      TrackingConfig(tracking_uri=tracking_uri, experiment="x"),
                                      "0" * 32)
    return table is None


def test_a_failed_artifact_is_a_warning_not_a_failure(prefect_harness, tmp_path):
    state = failing_artifacts(f"sqlite:///{tmp_path}/mlflow.db", return_state=True)
    assert state.is_completed() and state.result() is True
    deadline, warnings = time.monotonic() + ceiling(60), []
    with get_client(sync_client=True) as c:  # the run's log lines reach the API in the background
        while len(warnings) < 2 and time.monotonic() < deadline:
            logs = c.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            warnings = [log.message for log in logs if "artifact not written" in log.message]
            time.sleep(0.5)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("Prefect progress artifact not written (")
    assert warnings[1].startswith("Prefect results table artifact not written (")
