"""The tracking server goes away mid-run (#16), with a real `mlflow server` as the store:
stopped while LoRA trains and started again 20 s later, the run completes with every buffered
metric; stopped for good, the CLI exits 4 in bounded time, and once the server is back
`close-stale` leaves no run RUNNING."""
from __future__ import annotations

import subprocess
import time

import psutil
import pytest
import yaml
from _procs import kill_all
from conftest import ROOT, ceiling, make_bench_config
from mlflow.tracking import MlflowClient
from test_faults import _cli, _cli_env

from flows.infra import stack

STEPS = 1500


def _config(tmp_path, tiny_model_dir, sst2_dir, url: str) -> dict:
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = [m for m in cfg["methods"] if m["name"] == "lora"]
    cfg["training"].update(max_steps=STEPS, eval_every=None, log_every=1, checkpoint_every=None,
                           num_threads=1)
    cfg["tracking"].update(tracking_uri=url, experiment="outage", system_metrics=False)
    return cfg


def _training(url: str) -> bool:
    """The event: the LoRA run has per-step losses in the store."""
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("outage")
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], "tags.`peft_bench.role` = 'child'")
    return bool(runs) and "train/loss" in runs[0].data.metrics


def _start(tmp_path, cfg: dict) -> subprocess.Popen:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT,
                            env=_cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_training(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + ceiling(240)
    while not _training(url):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "LoRA never logged a loss"
        time.sleep(0.5)


def _restart(tmp_path, port: int) -> stack.Proc:
    server = stack.start_mlflow_server(tmp_path / "stack", port=port, timeout=ceiling(90))
    assert server.port == port  # the same address, the same store
    return server


@pytest.mark.timeout(1500)
def test_a_20s_outage_is_ridden_out(prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    server = stack.start_mlflow_server(tmp_path / "stack", port=0, timeout=ceiling(90))
    servers, proc = [server], None
    try:
        cfg = _config(tmp_path, tiny_model_dir, sst2_dir, server.url)
        proc = _start(tmp_path, cfg)
        _wait_training(proc, server.url)
        stack.stop_procs([server])
        time.sleep(20)  # the outage itself: the scenario, not a wait for an event
        servers.append(_restart(tmp_path, server.port))
        output, _ = proc.communicate(timeout=ceiling(300))
        assert proc.returncode == 0, output[-3000:]
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        assert {r.info.status for r in runs} == {"FINISHED"}
        child = next(r for r in runs if r.data.tags.get("peft_bench.role") == "child")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, STEPS + 1))  # no metric lost in the outage
    finally:
        _teardown(proc, servers)


@pytest.mark.timeout(1500)
def test_a_server_that_stays_away_exits_4_and_leaves_nothing_running(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    server = stack.start_mlflow_server(tmp_path / "stack", port=0, timeout=ceiling(90))
    servers, proc = [server], None
    try:
        cfg = _config(tmp_path, tiny_model_dir, sst2_dir, server.url)
        cfg["training"]["max_steps"] = 100000
        proc = _start(tmp_path, cfg)
        _wait_training(proc, server.url)
        stack.stop_procs([server])
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=ceiling(300))
        took = time.monotonic() - t0
        assert proc.returncode == 4, output[-3000:]
        assert "stopped answering" in output and "Traceback" not in output, output[-3000:]
        assert took < ceiling(180), took  # MLflow's own retries alone would take minutes
        servers.append(_restart(tmp_path, server.port))
        out = subprocess.run(_cli("close-stale", "--tracking-uri", server.url, "--experiment",
                                  "outage"), cwd=ROOT, env=_cli_env(tmp_path),
                             capture_output=True, text=True, timeout=ceiling(120))
        assert out.returncode == 0, out.stdout + out.stderr
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        assert runs and "RUNNING" not in {r.info.status for r in runs}
    finally:
        _teardown(proc, servers)


def _teardown(proc, servers) -> None:
    if proc is not None and proc.poll() is None:
        kill_all([psutil.Process(proc.pid)])
        proc.communicate()
    stack.stop_procs(servers)
