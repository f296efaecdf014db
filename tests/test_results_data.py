"""Results as data: `peft-bench compare --format json|csv|markdown`, `peft-bench report
--format`, summary.json as the same document, `--version` and shell completion.

One real benchmark (the tiny local model, 2 methods x 2 seeds, a real Prefect test server and a
real MLflow sqlite store). Every number the documents hold is checked against MLflow read
directly with MlflowClient (child and aggregate runs) and recomputed here with numpy and scipy,
never with the code under test."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, ceiling, make_bench_config
from mlflow.tracking import MlflowClient
from scipy import stats as st
from typer.testing import CliRunner

from flows.benchmark import benchmark
from flows.cli.main import app

runner = CliRunner()
SEEDS = [11, 22]
NAME = 'ci, "quoted" bench'  # a comma and quotes: the CSV must quote the benchmark's cells
# summary key -> the child run's metric, spelled out here (not taken from tasks.common.names)
AGGREGATED = {"accuracy": "eval/accuracy", "f1_macro": "eval/f1_macro", "eval_loss": "eval/loss",
              "train_time_s": "train_time_s", "step_time_median_s": "step_time_median_s",
              "samples_per_s": "samples_per_s", "tokens_per_s": "tokens_per_s",
              "peak_memory_mb": "peak_memory_mb"}
ONE_VALUE = {"precision": "eval/precision", "recall": "eval/recall",
             "trainable_params": "trainable_params", "total_params": "total_params",
             "trainable_pct": "trainable_pct", "model_size_mb": "model_size_mb",
             "adapter_size_mb": "adapter_size_mb", "train_steps": "train_steps",
             "eval_time_s": "eval_time_s", "eval_samples_per_s": "eval_samples_per_s"}
SHARES = {"accuracy", "f1_macro", "precision", "recall"}  # intervals clipped to [0, 1]
# Times, memory and throughput: geometric means, intervals on the log scale (docs/results.md).
LOG_SCALE = {"train_time_s", "step_time_median_s", "samples_per_s", "tokens_per_s",
             "peak_memory_mb", "eval_time_s", "eval_samples_per_s"}


@pytest.fixture(scope="module")
def bench(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    tmp = tmp_path_factory.mktemp("results")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["name"] = NAME
    cfg["methods"] = cfg["methods"][:2]  # full (the reference) and lora
    cfg["training"].update(seeds=SEEDS, max_steps=2)
    result = benchmark(config=cfg)
    uri = cfg["tracking"]["tracking_uri"]
    return uri, result["parent_run_id"], Path(result["report_html"]).parent, tmp


def _invoke(uri: str, *args: str):
    return runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", "ci", *args])


@pytest.fixture(scope="module")
def doc(bench):
    uri, parent, _, _ = bench
    out = _invoke(uri, "--format", "json")
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def mlflow_runs(bench):
    """method -> seed -> the child run, and method -> the aggregate run, straight from MLflow."""
    uri, parent, _, _ = bench
    client = MlflowClient(uri)
    eid = client.get_run(parent).info.experiment_id
    children: dict = {}
    for r in client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{parent}'"):
        children.setdefault(r.data.tags["peft_bench.method"], {})[
            int(r.data.tags["peft_bench.seed"])] = r
    aggregates = {r.data.tags["peft_bench.method"]: r for r in client.search_runs(
        [eid], f"tags.`peft_bench.benchmark_run` = '{parent}'")}
    return client, children, aggregates


def _t(values, lo=-math.inf, hi=math.inf):
    """mean, std (ddof=1) and the 95% Student-t interval, clipped to [lo, hi]."""
    v = np.asarray(values, float)
    low, high = st.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=st.sem(v))
    return v.mean(), v.std(ddof=1), max(lo, low), min(hi, high)


def _over_seeds(key, values):
    """mean, std, low, high as docs/results.md defines them for `key`, by numpy and scipy."""
    if key in LOG_SCALE and min(values) > 0:
        mean, std, low, high = _t(np.log(values))
        return math.exp(mean), std, math.exp(low), math.exp(high)
    if key in LOG_SCALE:  # a seed measured 0: arithmetic, clipped at 0
        return _t(values, 0)
    return _t(values, *((0, 1) if key in SHARES else (0, math.inf) if key == "eval_loss" else ()))


def _methods(doc) -> dict:
    return {m["method"]: m for m in doc["methods"]}


# ------------------------------------------------------------------ the numbers

def test_every_method_number_equals_mlflow(doc, mlflow_runs):
    _, children, _ = mlflow_runs
    methods = _methods(doc)
    assert list(methods) == ["full", "lora"] and set(children) == {"full", "lora"}
    for name, by_seed in children.items():
        m = methods[name]
        assert m["status"] == "FINISHED" and m["n_seeds"] == 2 and m["seeds"] == SEEDS
        assert m["run_ids"] == [by_seed[s].info.run_id for s in SEEDS]
        assert m["failed_seeds"] == [] and m["error"] is None
        for key, metric in AGGREGATED.items():
            values = [by_seed[s].data.metrics[metric] for s in SEEDS]
            mean, std, low, high = _over_seeds(key, values)
            assert m[key] == pytest.approx(mean, rel=1e-12), (name, key)
            assert m[f"{key}_std"] == pytest.approx(std, rel=1e-9), (name, key)
            assert m[f"{key}_ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12), (name, key)
            assert m[f"{key}_ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12), (name, key)
            assert m[f"{key}_ci"] == [m[f"{key}_ci_low"], m[f"{key}_ci_high"]]
        for key, metric in ONE_VALUE.items():
            values = [by_seed[s].data.metrics[metric] for s in SEEDS]
            assert m[key] == pytest.approx(_over_seeds(key, values)[0], rel=1e-12), (name, key)
    assert isinstance(methods["lora"]["trainable_params"], int)
    assert methods["lora"]["trainable_params"] < methods["full"]["trainable_params"]


def test_numbers_equal_the_aggregate_runs(doc, mlflow_runs):
    _, _, aggregates = mlflow_runs
    for name, m in _methods(doc).items():
        logged = aggregates[name].data.metrics
        assert logged["n_seeds"] == m["n_seeds"]
        for key in AGGREGATED:
            for stat, field in (("mean", key), ("std", f"{key}_std"), ("ci_low", f"{key}_ci_low"),
                                ("ci_high", f"{key}_ci_high")):
                assert logged[f"{key}_{stat}"] == m[field], (name, key, stat)
        for key in ("acc_diff_vs_ref", "time_ratio_vs_ref", "memory_ratio_vs_ref"):
            for stat in ("mean", "ci_low", "ci_high"):
                assert logged.get(f"{key}_{stat}") == m[f"{key}_{stat}"], (name, key, stat)


def _log_ratio(ours, ref):
    logs = [math.log(o / r) for o, r in zip(ours, ref) if o > 0 and r > 0]
    mean, _, low, high = _t(logs)
    return math.exp(mean), math.exp(low), math.exp(high)


def test_paired_verdict_by_hand(doc, mlflow_runs):
    _, children, _ = mlflow_runs
    full, lora = _methods(doc)["full"], _methods(doc)["lora"]
    assert full["reference"] == lora["reference"] == doc["reference"] == "full"
    for key in ("acc_diff_vs_ref_mean", "time_ratio_vs_ref_mean", "significant", "verdict"):
        assert full[key] is None, key  # the reference is not compared with itself

    def col(method, metric):
        return [children[method][s].data.metrics[metric] for s in SEEDS]

    diffs = np.subtract(col("lora", "eval/accuracy"), col("full", "eval/accuracy"))
    mean, _, low, high = _t(diffs, -1, 1)
    assert lora["acc_diff_vs_ref_mean"] == pytest.approx(mean, abs=1e-12)
    assert lora["acc_diff_vs_ref_ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert lora["acc_diff_vs_ref_ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
    # Identical differences on every seed: no interval width, McNemar on every seed decides
    # (its p-values are checked by hand in tests/test_report.py).
    ps = [m["p"] for v in doc["verdicts"] if v["method"] == "lora"
          for m in v["numbers"]["mcnemar"].values()]
    same = np.std(diffs, ddof=1) < 1e-9
    assert lora["significant"] == (all(p < 0.05 for p in ps) if same else not low <= 0 <= high)
    assert lora["paired_seeds"] == 2
    assert lora["verdict"] == ("significant" if lora["significant"] else "not significant")
    for key, metric in (("time_ratio_vs_ref", "train_time_s"),
                        ("memory_ratio_vs_ref", "peak_memory_mb")):
        expect = _log_ratio(col("lora", metric), col("full", metric))
        got = (lora[f"{key}_mean"], lora[f"{key}_ci_low"], lora[f"{key}_ci_high"])
        assert got == pytest.approx(expect, rel=1e-9), key
    verdict = next(v for v in doc["verdicts"] if v["method"] == "lora")
    assert verdict["numbers"]["accuracy_diff"]["mean"] == lora["acc_diff_vs_ref_mean"]
    assert [v["method"] for v in doc["verdicts"]] == ["lora"]


def test_identity_and_schema(doc, bench, mlflow_runs):
    _, parent, _, _ = bench
    client = mlflow_runs[0]
    run = client.get_run(parent)
    assert doc["schema_version"] == 1
    assert doc["peft_bench_version"] == metadata.version("peft-bench")
    assert doc["parent_run_id"] == parent and doc["benchmark"] == NAME
    assert doc["benchmark"] == run.data.tags["peft_bench.benchmark"]
    assert doc["experiment"] == client.get_experiment(run.info.experiment_id).name == "ci"
    assert doc["config_hash"] == run.data.tags["peft_bench.config_hash"]
    started = datetime.fromtimestamp(run.info.start_time // 1000, tz=timezone.utc)
    assert datetime.fromisoformat(doc["started_at"]) == started
    assert doc["seeds"] == SEEDS and doc["random_init"] is True
    assert doc["model"] == run.data.params["model.name_or_path"]
    for m in doc["methods"]:
        assert m["parent_run_id"] == parent and m["benchmark"] == NAME
    assert list(doc["methods"][0]) == list(doc["methods"][1])  # one key set for every method


def test_regression_check_is_the_stored_one_or_the_baseline(doc, bench, mlflow_runs):
    uri, parent, _, _ = bench
    stored = json.loads(mlflow_runs[0].get_run(parent).data.tags["peft_bench.regressions"])
    check = doc["regression"]
    assert check["against"] == "history" and check["baseline_run"] is None
    assert check["baselines"] == stored["baselines"] == []  # the first run of this benchmark
    assert check["flags"] == stored["flags"] == [] and doc["regressions"] == []
    out = _invoke(uri, "--format", "json", "--baseline", parent)  # itself: the same numbers
    assert out.exit_code == 0, out.output
    against = json.loads(out.stdout)
    assert against["regression"]["against"] == "baseline"
    assert against["regression"]["baselines"] == [parent] == [against["regression"]["baseline_run"]]
    assert against["regression"]["flags"] == []
    assert [m["regressed_metrics"] for m in against["methods"]] == [[], []]
    assert against["methods"] == [dict(m, regressed_metrics=[]) for m in doc["methods"]]


def test_regressed_metrics_name_the_flagged_ones(doc):
    """A flag the alarm raised (built by hand: one benchmark has nothing to regress against)
    lands on its own method's row, and in the regression section with its message."""
    from tasks.analysis.regression import Check, Flag
    from tasks.reporting.results import method_entry, regression_section

    flag = Flag("lora", "train_time_s", old=1.0, new=2.0, tolerance=0.5, runs=["earlier"])
    check = Check(baselines=["earlier"], flags=[flag])
    header = {k: doc[k] for k in ("parent_run_id", "benchmark", "reference")}
    got = {m["method"]: method_entry(m, header, None, check)["regressed_metrics"]
           for m in doc["methods"]}
    assert got == {"full": [], "lora": ["train_time_s"]}
    section = regression_section(check, "earlier")
    assert section["against"] == "baseline" and section["flags"][0]["new"] == 2.0
    assert section["flags"][0]["message"].startswith("lora: train_time_s")


# ------------------------------------------------------------------ the writings

def _decoded(cell: str, like):
    """A CSV cell read back by the rule docs/results.md gives: empty = null, text as it is,
    anything else JSON."""
    if cell == "":
        return None
    return cell if isinstance(like, str) else json.loads(cell)


def test_csv_is_the_json_flat(bench, doc):
    uri, _, _, _ = bench
    out = _invoke(uri, "--format", "csv")
    assert out.exit_code == 0, out.output
    reader = csv.DictReader(io.StringIO(out.stdout))
    rows = list(reader)
    assert reader.fieldnames == list(doc["methods"][0])  # the JSON's method fields, in order
    assert len(rows) == len(doc["methods"]) == 2
    for row, m in zip(rows, doc["methods"]):
        for key, value in m.items():
            assert _decoded(row[key], value) == value, (m["method"], key)  # floats exactly
    assert {row["benchmark"] for row in rows} == {NAME}
    assert '"ci, ""quoted"" bench"' in out.stdout  # quoted, its quotes doubled


def test_unknown_format_is_refused_naming_the_choices(bench):
    uri, _, _, _ = bench
    out = _invoke(uri, "--format", "xml")
    assert out.exit_code == 2 and "--format" in out.output
    for choice in ("table", "markdown", "json", "csv"):
        assert f"'{choice}'" in out.output, choice
    assert out.stdout == ""


def test_markdown_is_the_reports_tables(bench, doc):
    uri, _, report_dir, _ = bench
    out = _invoke(uri, "--format", "markdown")
    assert out.exit_code == 0, out.output
    md = out.stdout
    report = (report_dir / "report.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith(("| full", "| lora"))]
    assert len(rows) == 3  # two methods, one verdict
    assert all(line in report.splitlines() for line in rows)  # the same cells as the report
    lora = _methods(doc)["lora"]
    half = (lora["accuracy_ci_high"] - lora["accuracy_ci_low"]) / 2
    assert f"{lora['accuracy']:.4f} ± {half:.4f}" in rows[1]
    assert "## Verdicts against full" in md and "## Regression check" in md
    assert f"{100 * lora['acc_diff_vs_ref_mean']:+.1f} pt" in md


def test_summary_json_is_the_same_document(bench, doc):
    _, _, report_dir, _ = bench
    summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary == doc


def test_report_format_json_prints_the_document_alone(bench, tmp_path):
    uri, parent, _, _ = bench
    out = runner.invoke(app, ["report", parent, "--out", str(tmp_path), "--tracking-uri", uri,
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    written = (tmp_path / parent / "summary.json").read_text(encoding="utf-8")
    assert out.stdout == written and json.loads(out.stdout)["schema_version"] == 1
    assert "report:" in out.stderr and str(tmp_path / parent / "report.html") in out.stderr


# ------------------------------------------------------------------ the schema's page

def _documented() -> tuple[str, set[str]]:
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    return text, set(re.findall(r"`([a-z_0-9]+)`", text))


def test_docs_name_every_field(doc):
    _, documented = _documented()
    fields = set(doc) | set(doc["methods"][0]) | set(doc["regression"])
    fields |= set(doc["verdicts"][0]) | set(doc["verdicts"][0]["numbers"])
    assert fields - documented == set()


def test_docs_example_is_real_output(doc):
    """The example on the page is a real document: its keys are the schema's, its numbers
    the kinds the schema says."""
    text, _ = _documented()
    assert "(results-example.json)" in text  # the page links it
    example = json.loads((ROOT / "docs" / "results-example.json").read_text(encoding="utf-8"))
    assert example["schema_version"] == 1
    assert list(example) == list(doc)
    assert [list(m) for m in example["methods"]] == [list(doc["methods"][0])] * len(
        example["methods"])


# ------------------------------------------------------------------ --version, completion

def test_version_is_the_installed_package():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0
    assert out.stdout == f"peft-bench {metadata.version('peft-bench')}\n"


def test_show_completion_prints_a_bash_script():
    out = runner.invoke(app, ["--show-completion", "bash"], prog_name="peft-bench")
    assert out.exit_code == 0, out.output
    assert "complete -o default -F _peft_bench_completion peft-bench" in out.stdout
    assert "_PEFT_BENCH_COMPLETE=complete_bash" in out.stdout


def test_completion_completes_commands_and_formats():
    """What the installed script answers when bash asks (the protocol the script above uses)."""
    cli = Path(sys.executable).parent / "peft-bench"

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {**os.environ, "_PEFT_BENCH_COMPLETE": "complete_bash", "COMP_WORDS": line,
               "COMP_CWORD": str(len(words) - 1)}
        out = subprocess.run([str(cli)], env=env, capture_output=True, text=True,
                             timeout=ceiling(60))
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("peft-bench com") == ["compare"]
    assert complete("peft-bench compare --format ") == ["table", "markdown", "json", "csv"]
