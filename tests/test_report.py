"""The report reads a real MLflow sqlite store (built here with the pipeline's schema) and must
show exactly the numbers MLflow holds."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from tasks import report as report_mod
from tasks.report import ReportError, child_runs, generate_report, latest_parent_run

EXPERIMENT = "peft-bench-test"
# method -> (kind, train_time_s, final accuracy, trainable_params, model_size_mb, adapter_size_mb)
METHODS = {
    "full": ("full", 412.3456789, 0.9123, 124_441_346, 474.71, None),
    "lora-r8": ("lora", 201.987654321, 0.9034, 812_546, 474.9, 3.1234),
    "dora-r8": ("dora", 250.1111, 0.9051, 889_346, 475.2, 3.41),
    "qlora-r8": ("qlora", 333.3333, 0.8990, 812_546, 127.64, 3.1234),
}
FAILED = ("qdora-r8", "qdora", "RuntimeError: CUDA out of memory | tried to allocate 2.00 GiB")


def _child_metrics(kind, t, acc, trainable, model_mb, adapter_mb, now) -> list[Metric]:
    ms = [Metric("train/loss", 0.7 - 0.05 * s + t * 2e-4, now + s, s) for s in range(1, 9)]
    ms += [Metric("train/lr", 2e-4 * (1 - s / 9), now + s, s) for s in range(1, 9)]
    for i, s in enumerate((3, 6, 8)):  # three evaluations, the last one is the final
        a = acc - 0.02 * (2 - i)
        ms += [Metric("eval/accuracy", a, now + s, s), Metric("eval/loss", 0.5 - a / 3, now + s, s),
               Metric("eval/f1_macro", a - 0.0011, now + s, s),
               Metric("eval/precision", a - 0.002, now + s, s),
               Metric("eval/recall", a + 0.001, now + s, s)]
    single = {"train_time_s": t, "eval_time_s": t / 17, "samples_per_s": 4096 / t,
              "tokens_per_s": 4096 * 61.7 / t, "eval_samples_per_s": 872 / (t / 17),
              "peak_memory_mb": 1000 + t * 3.3, "trainable_params": trainable,
              "total_params": 124_441_346, "trainable_pct": 100 * trainable / 124_441_346,
              "model_size_mb": model_mb, "train_steps": 8}
    if adapter_mb is not None:
        single["adapter_size_mb"] = adapter_mb
    return ms + [Metric(k, float(v), now + 20, 0) for k, v in single.items()]


def build_store(root: Path, random_init: str = "true", methods=METHODS, failed=FAILED):
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="bench", tags={
        "peft_bench.role": "parent", "peft_bench.benchmark": "sst2-small",
        "peft_bench.random_init": random_init, "peft_bench.git_sha": "abc1234def",
        "peft_bench.device": "cpu", "peft_bench.data_digest": "sha256:0f3c9e"}).info.run_id
    params = {"model.name_or_path": "openai-community/gpt2", "data.source": "stanfordnlp/sst2",
              "training.lr": "0.0002", "versions.torch": "2.13.0",
              "versions.transformers": "5.1.0", "versions.peft_bench": "0.1.0"}
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    now = int(time.time() * 1000)
    for name, (kind, *nums) in methods.items():
        run = client.create_run(exp, run_name=name, tags=_child_tags(parent, name, kind)).info.run_id
        client.log_batch(run, metrics=_child_metrics(kind, *nums, now))
        client.set_terminated(run, "FINISHED")
    if failed:
        name, kind, error = failed
        tags = {**_child_tags(parent, name, kind), "peft_bench.error": error}
        run = client.create_run(exp, run_name=name, tags=tags).info.run_id
        client.log_metric(run, "train/loss", 0.69, step=1)
        client.set_terminated(run, "FAILED")
    client.set_terminated(parent, "FINISHED")
    return uri, parent


def _child_tags(parent, name, kind) -> dict:
    return {"mlflow.parentRunId": parent, "peft_bench.role": "child",
            "peft_bench.method": name, "peft_bench.method_kind": kind}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri, parent = build_store(root)
    result = generate_report(parent, uri, root / "reports")
    return uri, parent, root, result


def test_files_exist(bench):
    _, parent, root, result = bench
    assert result.dir == root / "reports" / parent
    for path in (result.markdown_path, result.html_path, result.dir / "summary.json"):
        assert path.is_file() and path.stat().st_size > 0
    assert len(result.charts) == 7
    for chart in result.charts:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No temp folder left next to the report.
    assert [p.name for p in (root / "reports").iterdir()] == [parent]


def test_summary_equals_mlflow(bench):
    uri, parent, _, result = bench
    client = MlflowClient(uri)
    summary = json.loads((result.dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["methods"] == json.loads(json.dumps(result.summary))
    by_method = {m["method"]: m for m in summary["methods"]}
    assert set(by_method) == set(METHODS) | {FAILED[0]}
    for run in child_runs(uri, parent):
        row = by_method[run.data.tags["peft_bench.method"]]
        if run.info.status != "FINISHED":
            continue
        metrics = client.get_run(run.info.run_id).data.metrics
        for key, metric in report_mod.SUMMARY_METRICS.items():
            assert row[key] == metrics.get(metric), (row["method"], key)
        assert row["accuracy"] == client.get_metric_history(run.info.run_id, "eval/accuracy")[-1].value


def test_relative_time(bench):
    uri, _, _, result = bench
    rows = {r["method"]: r for r in result.summary}
    assert rows["full"]["train_time_pct_of_full"] == 100.0
    full, lora = rows["full"]["train_time_s"], rows["lora-r8"]["train_time_s"]
    assert rows["lora-r8"]["train_time_pct_of_full"] == 100 * lora / full
    assert f"{100 * lora / full:.1f}%" in result.markdown_path.read_text(encoding="utf-8")


def test_failed_method_in_table_not_in_charts(bench):
    _, _, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    name, _, error = FAILED
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    assert "FAILED" in row
    assert error.replace("|", "\\|") in row
    assert error in md  # unescaped, in the failures section
    summary = json.loads((result.dir / "summary.json").read_text(encoding="utf-8"))
    assert name not in summary["chart_methods"]
    assert set(summary["chart_methods"]) == set(METHODS)
    failed = next(m for m in summary["methods"] if m["method"] == name)
    assert failed["status"] == "FAILED" and failed["error"] == error
    assert failed["pareto_optimal"] is None
    assert name in result.html_path.read_text(encoding="utf-8")


def test_header_and_html(bench):
    uri, parent, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    for text in ("sst2-small", parent, "openai-community/gpt2", "stanfordnlp/sst2",
                 "sha256:0f3c9e", "abc1234def", "torch 2.13.0", "transformers 5.1.0",
                 f"mlflow ui --backend-store-uri {uri}"):
        assert text in md, text
    html = result.html_path.read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == len(result.charts)
    assert "<img src=\"http" not in html and ".png\"" not in html  # self-contained


def test_pareto(bench):
    _, _, _, result = bench
    best = {r["method"] for r in result.summary if r["pareto_optimal"]}
    # lora is fastest; dora is the most accurate among those faster than full; full is the most
    # accurate overall; qlora is slower and less accurate than lora and dora.
    assert best == {"lora-r8", "dora-r8", "full"}


def test_random_init_warning(bench, tmp_path):
    _, _, _, result = bench
    assert "randomly initialised" in result.markdown_path.read_text(encoding="utf-8")
    assert "randomly initialised" in result.html_path.read_text(encoding="utf-8").lower()
    uri, parent = build_store(tmp_path, random_init="false", failed=None)
    other = generate_report(parent, uri, tmp_path / "reports")
    assert "randomly initialised" not in other.markdown_path.read_text(encoding="utf-8")
    assert "randomly initialised" not in other.html_path.read_text(encoding="utf-8").lower()


def test_artifacts_logged_on_parent(bench):
    uri, parent, _, result = bench
    names = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report.md", "report.html", "summary.json"} <= names
    assert {c.name for c in result.charts} <= names


def test_missing_parent_leaves_nothing(tmp_path):
    uri, _ = build_store(tmp_path, failed=None)
    out = tmp_path / "reports"
    with pytest.raises(ReportError, match="0123456789abcdef0123456789abcdef"):
        generate_report("0123456789abcdef0123456789abcdef", uri, out)
    assert not (out / "0123456789abcdef0123456789abcdef").exists()
    assert not out.exists() or not any(out.iterdir())


def test_failure_midway_leaves_no_partial_report(tmp_path, monkeypatch):
    uri, parent = build_store(tmp_path, failed=None)
    out = tmp_path / "reports"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_mod, "render_html", boom)  # after the charts are on disk
    with pytest.raises(OSError, match="disk full"):
        generate_report(parent, uri, out)
    assert list(out.iterdir()) == []
    assert MlflowClient(uri).list_artifacts(parent, "report") == []


def test_no_full_baseline_and_rerun_replaces(tmp_path):
    methods = {k: v for k, v in METHODS.items() if k != "full"}
    uri, parent = build_store(tmp_path, methods=methods, failed=("full", "full", "OOM"))
    first = generate_report(parent, uri, tmp_path / "reports")
    assert all(r["train_time_pct_of_full"] is None for r in first.summary)
    assert "No successful full fine-tuning run" in first.markdown_path.read_text(encoding="utf-8")
    again = generate_report(parent, uri, tmp_path / "reports")
    assert again.dir == first.dir and again.html_path.is_file()
    assert [p.name for p in (tmp_path / "reports").iterdir()] == [parent]


def test_child_run_id_is_refused(bench):
    uri, parent, root, _ = bench
    child = child_runs(uri, parent)[0].info.run_id
    with pytest.raises(ReportError, match="child run"):
        generate_report(child, uri, root / "other")


def test_latest_parent_run(bench):
    uri, parent, _, _ = bench
    assert latest_parent_run(uri, EXPERIMENT) == parent
    assert latest_parent_run(uri, "no-such-experiment") is None
    assert len(child_runs(uri, parent)) == len(METHODS) + 1


def test_task_fn_publishes_markdown(tmp_path, monkeypatch):
    """The task body without a Prefect server: the artifact call is captured."""
    uri, parent = build_store(tmp_path, failed=None)
    published = {}
    monkeypatch.setattr(report_mod, "create_markdown_artifact",
                        lambda **kw: published.update(kw))
    result = report_mod.generate_report_task.fn(parent, uri, tmp_path / "reports")
    assert result.html_path.is_file()
    assert published["key"] == "peft-bench-report"
    assert all(c.islower() or c.isdigit() or c == "-" for c in published["key"])
    assert "| lora-r8" in published["markdown"] and "](train_time.png)" not in published["markdown"]
