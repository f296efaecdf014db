"""End to end: the benchmark flow under a real Prefect test server, a real MLflow sqlite store,
real SST-2 rows and a real (tiny, local) transformers model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_bench_config
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from tasks.report import read_children

SUMMARY = ["train_time_s", "step_time_median_s", "other_cpu_share", "samples_per_s", "tokens_per_s", "peak_memory_mb", "memory_avg_mb", "memory_p99_mb", "trainable_params",
           "trainable_pct", "model_size_mb", "adapter_size_mb", "eval/accuracy", "eval/loss",
           "eval/f1_macro", "eval/precision", "eval/recall"]


@pytest.fixture(scope="module")
def finished(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    """One benchmark run shared by the tests below: 4 methods plus one that must fail."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["methods"].append({"name": "broken", "method": "full", "lr": 1.0e6})  # diverges
    result = benchmark(config=cfg)
    return cfg, result, MlflowClient(cfg["tracking"]["tracking_uri"])


def test_children_finished_with_metrics(finished):
    cfg, result, client = finished
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["peft_bench.random_init"] == "true"
    assert parent.data.params["data.train_size"] == "96"
    assert parent.data.tags["peft_bench.failed_methods"] == "broken"
    runs = {r.data.tags["peft_bench.method"]: r for r in read_children(cfg["tracking"]["tracking_uri"],
                                                                      result["parent_run_id"])}
    assert sorted(runs) == ["broken", "dora", "full", "lora", "qlora"]
    for name in ("full", "lora", "dora", "qlora"):
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
        assert run.data.tags["prefect.flow_run_id"]
        missing = [k for k in SUMMARY if k not in run.data.metrics]
        assert not missing, (name, missing)
        assert run.data.metrics["train_steps"] == 4
        assert run.data.params["method.method"] == name
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2, 3, 4]
        steps = sorted(client.get_metric_history(run.info.run_id, "train/step_time_s"),
                       key=lambda m: m.step)
        assert [m.step for m in steps] == [1, 2, 3, 4]
        # Steady state: the first 3 steps (training.timing_warmup_steps) are left out.
        assert run.data.metrics["step_time_median_s"] == steps[3].value
        total = sum(m.value for m in steps)  # eval and logging pauses are in neither
        assert total <= run.data.metrics["train_time_s"] <= total + 0.5, name
        assert run.data.tags["peft_bench.seed"] == "42"
        evals = client.get_metric_history(run.info.run_id, "eval/accuracy")
        assert [m.step for m in evals] == [2, 4]
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions.csv", "confusion_matrix.png", "config.yaml", "adapter"} <= arts
        assert run.inputs.dataset_inputs, name  # lineage via mlflow.data, with a digest
        assert run.inputs.dataset_inputs[0].dataset.digest
    assert runs["broken"].info.status == "FAILED"
    assert "training diverged at step" in runs["broken"].data.tags["peft_bench.error"]


def test_method_specific_numbers(finished):
    cfg, result, client = finished
    m = {r.data.tags["peft_bench.method"]: r.data.metrics
         for r in read_children(cfg["tracking"]["tracking_uri"], result["parent_run_id"])}
    assert m["full"]["trainable_pct"] == 100.0
    assert m["lora"]["trainable_params"] < m["dora"]["trainable_params"] < m["full"]["trainable_params"]
    assert m["qlora"]["trainable_params"] == m["lora"]["trainable_params"]
    assert m["qlora"]["model_size_mb"] < m["lora"]["model_size_mb"]  # the 4-bit file is smaller
    assert m["lora"]["adapter_size_mb"] < m["full"]["adapter_size_mb"]
    assert all(v["peak_memory_mb"] > 0 for k, v in m.items() if k != "broken")


def test_report_numbers_equal_mlflow(finished):
    cfg, result, client = finished
    report_dir = Path(result["report_html"]).parent
    summary = json.loads((report_dir / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["methods"]}
    for run in read_children(cfg["tracking"]["tracking_uri"], result["parent_run_id"]):
        row = rows[run.data.tags["peft_bench.method"]]
        assert row["status"] == run.info.status
        if run.info.status != "FINISHED":
            assert row["accuracy"] is None and row["error"]
            continue
        for key, metric in (("accuracy", "eval/accuracy"), ("train_time_s", "train_time_s"),
                            ("peak_memory_mb", "peak_memory_mb"),
                            ("memory_avg_mb", "memory_avg_mb"), ("memory_p99_mb", "memory_p99_mb"),
                            ("adapter_size_mb", "adapter_size_mb")):
            assert math.isclose(row[key], run.data.metrics[metric], rel_tol=0, abs_tol=0), key
    md = (report_dir / "report.md").read_text()
    assert "randomly initialised" in md and "FAILED" in md
    arts = {a.path for a in client.list_artifacts(result["parent_run_id"], "report")}
    assert "report/report.html" in arts


def test_no_run_left_running(finished):
    cfg, _, client = finished
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    statuses = {r.info.status for r in client.search_runs([exp.experiment_id])}
    assert statuses == {"FINISHED", "FAILED"}
