"""A normal run prints our progress and results and nothing else: the warnings that were ours
are fixed, the rest of other libraries' output goes to the run's log file (logged on the parent
run), and `--verbose` shows it."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import yaml
from conftest import ROOT, make_bench_config
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.benchmark import benchmark
from flows.cli.main import app

runner = CliRunner()
OURS_FIXED = (r".*dataset source can be interpreted in multiple ways.*",
              r".*Inferred schema contains integer column.*")
OTHERS = ("LOAD REPORT", "gemm_4bit_forward", "Finished in state", "UserWarning",
          "Downloading artifacts", "system_metrics_monitor", "View run")


def test_a_toy_benchmark_raises_none_of_the_warnings_that_were_ours(prefect_harness, tmp_path,
                                                                    tiny_model_dir, sst2_dir):
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = cfg["methods"][1:4:2]  # lora and qlora
    with warnings.catch_warnings():
        for message in OURS_FIXED:
            warnings.filterwarnings("error", message=message)
        result = benchmark(config=cfg)
    assert result["failed"] == []


def test_the_console_shows_our_lines_and_the_log_file_the_rest(prefect_harness, tmp_path,
                                                               bench_config):
    bench_config["methods"] = bench_config["methods"][1:4:2]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bench_config))
    out = runner.invoke(app, ["run", str(path)])
    assert out.exit_code == 0, out.output
    assert "▶ lora seed 42" in out.output and "✓ qlora seed 42: validation accuracy" in out.output
    for noise in OTHERS:
        assert noise not in out.output, noise
    log = Path(re.search(r"log:\s+(\S+\.log)", out.output).group(1))
    text = log.read_text()
    assert "Finished in state Completed()" in text and "LOAD REPORT" in text  # kept, not shown
    parent = next(r for r in MlflowClient(bench_config["tracking"]["tracking_uri"]).search_runs(
        [MlflowClient(bench_config["tracking"]["tracking_uri"]).get_experiment_by_name("ci").experiment_id],
        "tags.`peft_bench.role` = 'parent'"))
    client = MlflowClient(bench_config["tracking"]["tracking_uri"])
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "logs")] == [f"logs/{log.name}"]
    loud = runner.invoke(app, ["run", str(path), "--verbose", "--methods", "lora"])
    assert loud.exit_code == 0 and "Finished in state Completed()" in loud.output
    lines = len(out.output.splitlines())
    print(f"\nconsole lines of a quiet 2-method run: {lines}")


def test_the_install_warns_about_no_package(tmp_path):
    """setuptools' "Package would be ignored" block came from the report templates' folder."""
    import shutil

    src = tmp_path / "src"  # a copy: a build writes build/ and *.egg-info into the source tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "reports", ".cache", ".checkpoints", "mlflow.db",
        ".whl", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "would be ignored" not in out.stdout + out.stderr
    wheel = next(tmp_path.glob("peft_bench-*.whl"))
    import zipfile

    shipped = zipfile.ZipFile(wheel).namelist()
    for template in ("report.html.j2", "report.md.j2", "tables.md.j2", "note.md.j2"):
        assert f"tasks/reporting/templates/{template}" in shipped


def test_after_a_run_other_libraries_info_lines_stay_off_the_console(tmp_path):
    """The run sets the root logger to INFO for its log file; left there, Prefect's console
    handler (put back when the run ends) printed httpx's "HTTP Request: POST .../api/logs/"
    lines as Prefect's log worker flushed at exit."""
    import logging

    from flows.cli import console

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)
    try:
        console.quiet_other_libraries(tmp_path / "run.log", verbose=False)
        assert logging.getLogger("httpx").isEnabledFor(logging.INFO)  # into the log file
        console.restore()
        assert root.level == logging.WARNING
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before)
