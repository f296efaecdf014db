"""Every `peft-bench` command through typer's CLI runner."""
from __future__ import annotations

import logging
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _reopen_log_streams():
    """CliRunner swaps sys.stderr for a buffer it closes afterwards; logging handlers created
    during an invoke (Prefect's console handler) keep that closed buffer. Point them back at
    the real stderr so the next command's log lines do not fail."""
    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                h.stream = sys.__stderr__  # setStream would flush the closed one
            console = getattr(h, "console", None)  # Prefect's handler prints through rich
            if console is not None and getattr(console.file, "closed", False):
                console.file = sys.__stderr__


@pytest.mark.parametrize("args", [[], ["run"], ["compare"], ["report"], ["make-tiny-model"],
                                  ["stack"]])
def test_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_make_tiny_model(tmp_path, sst2_dir):
    out = tmp_path / "m"
    result = runner.invoke(app, ["make-tiny-model", str(out), "--data", str(sst2_dir),
                                 "--n-layer", "1", "--n-embd", "32"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.json").read_text())["n_layer"] == 1
    result = runner.invoke(app, ["make-tiny-model", str(out), "--data", str(tmp_path / "none")])
    assert result.exit_code == 2 and "train.tsv" in result.output


@pytest.fixture
def config_file(tmp_path, bench_config):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench_config))
    return path


def test_run_compare_report(prefect_harness, config_file, bench_config, tmp_path):
    uri = bench_config["tracking"]["tracking_uri"]
    result = runner.invoke(app, ["run", str(config_file), "--methods", "lora,qlora",
                                 "--set", "training.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "mlflow ui --backend-store-uri" in result.output
    exp = MlflowClient(uri).get_experiment_by_name("ci")
    runs = MlflowClient(uri).search_runs([exp.experiment_id])
    roles = sorted(r.data.tags["peft_bench.role"] for r in runs)
    assert roles == ["aggregate"] * 2 + ["child"] * 2 + ["parent"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags["peft_bench.role"] == "parent")
    assert parent.data.params["training.max_steps"] == "2"

    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", "ci"])
    assert result.exit_code == 0, result.output
    assert "lora" in result.output and "qlora" in result.output and "FINISHED" in result.output
    assert "verdicts against lora" in result.output and "nothing to compare with" in result.output

    out = tmp_path / "rebuilt"
    result = runner.invoke(app, ["report", parent.info.run_id, "--out", str(out),
                                 "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert (out / parent.info.run_id / "report.html").is_file()


def test_run_failing_method_exits_1(prefect_harness, config_file):
    result = runner.invoke(app, ["run", str(config_file), "--methods", "full,lora",
                                 "--set", "methods.0.lr=1e6", "--set", "training.max_steps=6"])
    assert result.exit_code == 1, result.output
    assert "failed runs: full/seed=42" in result.output
    result = runner.invoke(app, ["run", str(config_file), "--methods", "full",
                                 "--set", "methods.0.lr=1e6", "--set", "training.max_steps=6"])
    assert result.exit_code == 1 and "every run failed: full/seed=42" in result.output


@pytest.mark.parametrize("args,message", [
    (["--set", "training.lr=0"], "training.lr: Input should be greater than 0"),
    (["--methods", "lora,ia3"], "--methods: unknown method(s) ['ia3']"),
    (["--set", "training"], "--set 'training': expected key=value"),
])
def test_run_bad_input_exits_2(config_file, args, message):
    result = runner.invoke(app, ["run", str(config_file), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_run_missing_config():
    result = runner.invoke(app, ["run", "missing.yaml"])
    assert result.exit_code == 2 and "missing.yaml: config file not found" in result.output


def test_compare_and_report_errors(tmp_path):
    uri = f"sqlite:///{tmp_path}/empty.db"
    result = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", "nothing"])
    assert result.exit_code == 1 and "no benchmark runs in experiment 'nothing'" in result.output
    result = runner.invoke(app, ["report", "0123abc", "--tracking-uri", uri])
    assert result.exit_code == 2 and "0123abc" in result.output  # bad input (tests/test_hostile)
