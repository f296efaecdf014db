"""Repeats, aggregates, the regression alarm and timing contamination, end to end: the
benchmark flow under a real Prefect test server, a real MLflow sqlite store, SST-2 rows and the
tiny local model. Expectations are computed here from what MLflow holds (numpy, scipy,
literal names), never with the aggregation code under test."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from conftest import ceiling, make_bench_config
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from scipy import stats as st
from typer.testing import CliRunner

from flows.benchmark import RegressionError, benchmark
from flows.cli.main import app
from tasks.report import read_children

SEEDS = [11, 22]
AGGREGATED = {"accuracy": "eval/accuracy", "f1_macro": "eval/f1_macro", "eval_loss": "eval/loss",
              "train_time_s": "train_time_s", "step_time_median_s": "step_time_median_s",
              "samples_per_s": "samples_per_s", "tokens_per_s": "tokens_per_s",
              "peak_memory_mb": "peak_memory_mb"}
# Positive quantities, summarised on the log scale: geometric mean, std of the logs, exp of the
# t-interval of the logs (a seed that measured 0, a CPU peak of 0 MB, leaves them linear).
LOG_SCALE = {"train_time_s", "step_time_median_s", "samples_per_s", "tokens_per_s",
             "peak_memory_mb"}


def _config(tmp, tiny_model_dir, sst2_dir, **training) -> dict:
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["name"] = "repeats"
    cfg["methods"] = cfg["methods"][:2]  # full (the reference) and lora
    cfg["training"].update(seeds=SEEDS, **training)
    # This module checks accuracy alarms; timings on a shared 2-core machine vary run to run.
    cfg["regression"] = {"time_rise": 100.0, "memory_rise": 100.0}
    return cfg


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    """The same 2-method x 2-seed benchmark twice in one experiment."""
    cfg = _config(tmp_path_factory.mktemp("repeats"), tiny_model_dir, sst2_dir)
    first = benchmark(config=cfg)
    second = benchmark(config=cfg)
    return cfg, first, second, MlflowClient(cfg["tracking"]["tracking_uri"])


def _children(cfg, result) -> list:
    return read_children(cfg["tracking"]["tracking_uri"], result["parent_run_id"])


def _aggregates(client, cfg, result) -> dict:
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`peft_bench.benchmark_run` = '{result['parent_run_id']}'")
    return {r.data.tags["peft_bench.method"]: r for r in runs}


def test_each_method_and_seed_is_its_own_flow_run_and_mlflow_run(runs):
    cfg, first, _, client = runs
    with get_client(sync_client=True) as pc:
        flow_runs = [fr for fr in pc.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["finetune"])), limit=200)
            if fr.parameters.get("parent_run_id") == first["parent_run_id"]]
    assert sorted((fr.parameters["method_name"], fr.parameters["seed"]) for fr in flow_runs) == [
        ("full", 11), ("full", 22), ("lora", 11), ("lora", 22)]
    assert {fr.state.type.value for fr in flow_runs} == {"COMPLETED"}
    kids = _children(cfg, first)
    assert len(kids) == 4 and {k.info.status for k in kids} == {"FINISHED"}
    for k in kids:
        seed = k.data.tags["peft_bench.seed"]
        assert k.data.params["training.seed"] == seed
        assert k.data.tags["peft_bench.seed_index"] == str(SEEDS.index(int(seed)))
        assert k.data.tags["mlflow.parentRunId"] == first["parent_run_id"]
    assert sorted(first["states"]) == ["full/seed=11", "full/seed=22", "lora/seed=11",
                                       "lora/seed=22"]


def test_method_order_rotates_from_seed_to_seed(runs):
    cfg, first, _, _ = runs
    order = [(k.data.tags["peft_bench.method"], int(k.data.tags["peft_bench.seed"]))
             for k in _children(cfg, first)]  # oldest first
    assert order == [("full", 11), ("lora", 11), ("lora", 22), ("full", 22)]


def test_same_seed_same_result_other_seed_other_result(runs):
    cfg, first, second, client = runs

    def by_key(result):
        return {(k.data.tags["peft_bench.method"], k.data.tags["peft_bench.seed"]): k
                for k in _children(cfg, result)}

    a, b = by_key(first), by_key(second)
    for key in a:
        for metric in ("eval/accuracy", "eval/loss"):
            assert a[key].data.metrics[metric] == b[key].data.metrics[metric], (key, metric)
    loss = {key: [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
            for key, run in a.items()}
    assert loss[("lora", "11")] != loss[("lora", "22")]  # data order and init follow the seed


def test_aggregate_runs_hold_the_mean_and_interval_of_the_children(runs):
    cfg, first, _, client = runs
    aggs = _aggregates(client, cfg, first)
    assert set(aggs) == {"full", "lora"}
    kids = _children(cfg, first)
    for method, agg in aggs.items():
        assert agg.info.status == "FINISHED" and "mlflow.parentRunId" not in agg.data.tags
        assert agg.data.tags["peft_bench.role"] == "aggregate"
        m = agg.data.metrics
        assert m["n_seeds"] == 2
        mine = [client.get_run(k.info.run_id).data.metrics for k in kids
                if k.data.tags["peft_bench.method"] == method]
        geometric = set(agg.data.tags["peft_bench.geometric_means"].split(",")) - {""}
        for key, metric in AGGREGATED.items():
            values = np.array([x[metric] for x in mine])
            log = key in LOG_SCALE and bool((values > 0).all())
            assert (key in geometric) == log, (method, key)
            spread = np.log(values) if log else values  # the scale the interval is taken on
            mean = st.gmean(values) if log else values.mean()
            assert m[f"{key}_mean"] == pytest.approx(mean, rel=1e-12), (method, key)
            assert m[f"{key}_std"] == pytest.approx(spread.std(ddof=1), rel=1e-9, abs=1e-15)
            if spread.std() > 0:
                low, high = st.t.interval(0.95, 1, loc=spread.mean(), scale=st.sem(spread))
                if log:
                    low, high = np.exp(low), np.exp(high)
                    assert low > 0, (method, key)
                elif key in ("accuracy", "f1_macro"):
                    low, high = max(0.0, low), min(1.0, high)
                elif key in LOG_SCALE or key == "eval_loss":  # never negative
                    low = max(0.0, low)
                assert m[f"{key}_ci_low"] == pytest.approx(low, rel=1e-9), (method, key)
                assert m[f"{key}_ci_high"] == pytest.approx(high, rel=1e-9), (method, key)
    # The paired comparison with the reference (full) sits on lora's aggregate run.
    by = {(k.data.tags["peft_bench.method"], k.data.tags["peft_bench.seed"]): k.data.metrics
          for k in kids}
    diffs = [by[("lora", s)]["eval/accuracy"] - by[("full", s)]["eval/accuracy"] for s in ("11", "22")]
    lora = aggs["lora"].data.metrics
    assert lora["acc_diff_vs_ref_mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
    ratios = [by[("lora", s)]["train_time_s"] / by[("full", s)]["train_time_s"] for s in ("11", "22")]
    assert lora["time_ratio_vs_ref_mean"] == pytest.approx(math.exp(np.mean(np.log(ratios))), rel=1e-9)
    mcnemar = client.get_metric_history(aggs["lora"].info.run_id, "mcnemar_p")
    assert sorted(p.step for p in mcnemar) == SEEDS and all(0 <= p.value <= 1 for p in mcnemar)
    assert "acc_diff_vs_ref_mean" not in aggs["full"].data.metrics


def test_the_timing_flag_follows_the_measured_share(runs):
    """The flag, the warning and the report agree with the share other processes took. On a
    quiet machine nothing is flagged; beside another job (CI under load) the runs it disturbed
    are. Asserting "not flagged" would assert the machine is quiet, which no test controls:
    the burner test below plants the load and checks that it is caught."""
    cfg, first, _, _ = runs
    threshold = 0.2  # training.contamination_threshold's documented default
    flagged = []
    for k in _children(cfg, first):
        share = k.data.metrics["other_cpu_share"]
        contaminated = k.data.tags["peft_bench.timing_contaminated"] == "true"
        assert 0 <= share <= 1
        if abs(share - threshold) > 1e-3:  # the logged share is rounded
            assert contaminated == (share > threshold), (share, k.data.tags)
        assert ("peft_bench.timing_warning" in k.data.tags) == contaminated, k.data.tags
        flagged.append(contaminated)
    assert ("Timing contaminated" in open(first["report_md"]).read()) == any(flagged)


def test_identical_rerun_is_not_a_regression(runs):
    cfg, first, second, client = runs
    tags = client.get_run(second["parent_run_id"]).data.tags
    assert tags["peft_bench.regression_baselines"] == first["parent_run_id"]
    assert second["regressions"] == []
    assert "No regression against 1 earlier run" in open(second["report_md"]).read()


def test_known_drop_is_flagged_everywhere_and_fails_the_flow(runs, tmp_path):
    cfg, first, second, client = runs
    # Plant the drop in the history: lora was at 0.99 in both earlier benchmarks.
    for earlier in (first, second):
        client.log_metric(_aggregates(client, cfg, earlier)["lora"].info.run_id,
                          "accuracy_mean", 0.99)
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    with pytest.raises(RegressionError) as err:
        benchmark(config={**cfg, "regression": {**cfg["regression"], "fail_on_regression": True}})
    result = err.value.result
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"  # the benchmark itself completed
    lora_now = _aggregates(client, cfg, result)["lora"].data.metrics["accuracy_mean"]
    [flag] = result["regressions"]
    assert flag.startswith(f"lora: accuracy 0.9900 → {lora_now:.4f}")
    assert "lora: accuracy 0.9900" in parent.data.tags["peft_bench.regressions"]
    report = open(result["report_md"]).read()  # written although the flow failed
    assert report.index("**Regression:** lora: accuracy") < report.index("## Results")
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["peft-bench-regressions"])))
        assert any("lora: accuracy 0.9900" in (a.data or "") for a in arts)
        deadline, events = time.monotonic() + ceiling(60), []
        while not events and time.monotonic() < deadline:  # the server persists in batches
            events = pc.read_events(EventFilter(
                occurred=EventOccurredFilter(since=since),
                event=EventNameFilter(name=["peft-bench.regression.detected"])), limit=10).events
            time.sleep(1)
    assert events and events[0].resource.id == "peft-bench.benchmark.repeats"
    assert events[0].payload["parent_run_id"] == result["parent_run_id"]
    # The same comparison on demand, against a chosen run.
    out = CliRunner().invoke(app, ["compare", "--tracking-uri", cfg["tracking"]["tracking_uri"],
                                   "--parent", result["parent_run_id"],
                                   "--baseline", first["parent_run_id"]])
    assert out.exit_code == 0, out.output
    assert "REGRESSION lora: accuracy 0.9900" in " ".join(out.output.split())


def _burn(seconds: float) -> int:
    """A CPU burner that is not our child (its shell exits at once): another job on the machine."""
    code = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c '{code}' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_cpu_burnt_by_another_process_flags_the_timing(prefect_harness, tmp_path, tiny_model_dir,
                                                       sst2_dir):
    cfg = _config(tmp_path, tiny_model_dir, sst2_dir, max_steps=30, eval_every=None)
    cfg["methods"], cfg["training"]["seeds"] = cfg["methods"][1:], [5]
    pids = [_burn(90) for _ in range(os.cpu_count() or 2)]
    try:
        result = benchmark(config=cfg)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    [kid] = _children(cfg, result)
    share = kid.data.metrics["other_cpu_share"]
    assert kid.data.tags["peft_bench.timing_contaminated"] == "true" and share > 0.2
    warning = kid.data.tags["peft_bench.timing_warning"]
    assert warning.startswith("lora (seed 5): other processes used") and f"{100 * share:.0f}%" in warning
    report = open(result["report_md"]).read()
    assert f"Timing contaminated:** {warning}" in report


# Declared names that this run has no reason to write, and where they are checked instead.
NOT_WRITTEN_HERE = {
    "world_size": "distributed runs: test_distributed.py",
    "distributed_strategy": "distributed runs: test_distributed.py",
    "other_gpu_processes": "CUDA only",
    "peft_bench.error": "failed runs: test_pipeline.py",
    "peft_bench.timing_warning": "contaminated runs: the burner test above",
    "prefect.flow_run_url": "only when the Prefect server has a UI URL",
    "peft_bench.resumed_from_step": "resumed runs: test_faults.py",
    "peft_bench.resume_note": "a bad checkpoint on resume: test_checkpoint_recovery.py",
    "peft_bench.chosen": "sweeps: test_sweep.py", "peft_bench.chosen_point": "sweeps: test_sweep.py",
    "peft_bench.reused_from": "reused runs: test_sweep.py",
    "mlflow.experimentKind": "an experiment tag: test_browser.py",
    "peft_bench.pruned_at_step": "pruned sweep points: test_sweep_strategies.py",
    "peft_bench.trial": "halving/tpe sweep points: test_sweep_strategies.py",
    "mlflow.sharedViewState.": "a prefix of the saved view's experiment tag: test_ui_view.py",
    "mlflow.data.context": "a dataset input tag: test_pipeline.py (inputs with digests)",
    "peft_bench.model_sha256": "packaged models only: test_model_source.py",
    "peft_bench.label_names": "class-name labels only: test_labels.py",
}
NOT_NAMES = {"parent", "child", "aggregate", "grid", "predictions.csv", "report", "adapter",
             "logs", "peft-bench-report", "peft-bench-regressions",
             "peft-bench.regression.detected", "custom_model_development", "peft_bench.progress",
             "peft-bench-results-", "peft-bench-progress-",  # Prefect artifact key prefixes
             "peft-bench-methods", "viewStateShareKey"}  # the saved view's id, its URL key


def test_every_declared_name_is_written_by_a_real_run(runs):
    """Readers import their names from tasks/common/names.py (test_names.py); here every name declared
    there is found in what a real benchmark wrote, so nothing reads a name no run writes."""
    from tasks.common import names

    cfg, first, second, client = runs
    written: set[str] = set()
    runs_ = [client.get_run(first["parent_run_id"]), *_children(cfg, first),
             *_aggregates(client, cfg, first).values()]
    for run in runs_:
        full = client.get_run(run.info.run_id)
        written |= set(full.data.metrics) | set(full.data.tags)
    declared = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    declared |= {names.agg(k, s) for k in names.AGGREGATED for s in names.STATS}
    declared |= {names.paired(k, s) for k in names.PAIRED for s in names.PAIRED_STATS}
    declared |= set(names.CHILD_METRICS.values())
    declared -= set(names.PAIRED)  # stems of the paired names, not names
    # artifact files, and the summary keys that are no metric's name: not names a run holds
    declared -= set(names.ARTIFACT_FILES) | (set(names.SUMMARY_KEYS) - set(names.CHILD_METRICS.values()))
    missing = sorted(declared - written - set(NOT_WRITTEN_HERE) - NOT_NAMES)
    assert not missing, f"declared in tasks/common/names.py but written by no run: {missing}"
