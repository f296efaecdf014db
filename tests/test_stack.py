"""The local stack (flows/infra/stack.py) for real: Prefect server + MLflow server + process pool + a
worker, started in a tmp folder on free loopback ports, checked, then stopped. One stack for
the module (~25 s here); it is torn down even when a test fails. Plus the deploy files parse."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import ceiling
from typer.testing import CliRunner

from flows.infra import stack
from flows.infra.stack_cli import stack_app

ROOT = Path(__file__).resolve().parents[1]
POOL = "test-process"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    pids: list[int] = []
    try:
        t = time.monotonic()
        state = stack.stack_up(d, prefect_port=0, mlflow_port=0, pool=POOL, workers=1,
                               timeout=ceiling(75), ui=False)
        state["up_s"] = round(time.monotonic() - t, 1)
        print(f"\nstack timings: {state['timings']} total {state['up_s']}s")
        for p in stack.procs(d):
            pids += [m.pid for m in p.members()]
        yield d, state, pids
    finally:
        stack.stop_all(d, grace=5)
        left = [pid for pid in pids if not gone(pid)]
        for pid in left:  # never leave a server behind, whatever failed above
            os.kill(pid, signal.SIGKILL)


def test_stack_is_up(live):
    d, state, pids = live
    assert httpx.get(f"{state['prefect_api_url']}/health", timeout=5).json() is True
    assert httpx.get(f"{state['mlflow_url']}/health", timeout=5).status_code == 200
    for url in (state["prefect_url"], state["mlflow_url"]):
        assert url.startswith("http://127.0.0.1:")
    names = {p.name: p for p in stack.procs(d)}
    assert set(names) == {"prefect-server", "mlflow-server", "worker-1"}
    for p in names.values():
        assert p.alive() and (d / f"{p.name}.pid").read_text().strip() == str(p.pid)
        assert Path(p.log).is_file()
    assert stack.worker_registered(state["prefect_api_url"], POOL, "peft-bench-worker-1")
    assert (d / "prefect").is_dir() and (d / "mlflow" / "mlflow.db").is_file()
    env = (d / "env").read_text()
    assert f"export PREFECT_API_URL={state['prefect_api_url']}" in env
    assert f"export MLFLOW_TRACKING_URI={state['mlflow_url']}" in env
    assert set(state["timings"]) >= {"prefect_server_s", "mlflow_server_s", "work_pool_s",
                                     "worker-1_s"}


def test_pool_exists_and_create_is_idempotent(live):
    d, state, _ = live
    res = stack.prefect_cli(d, "work-pool", "inspect", POOL, "--output", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["type"] == "process"
    assert stack.create_work_pool(d, state["prefect_api_url"], POOL) is False


def test_mlflow_serves_artifacts(live):
    d, state, _ = live
    code = ("import mlflow, sys; mlflow.set_experiment('stack-test');\n"
            "with mlflow.start_run() as r:\n"
            "    mlflow.log_metric('m', 1.0); mlflow.log_text('hi', 'a.txt')\n"
            "print(r.info.artifact_uri)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **stack.stack_env(d)}, cwd=d, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("mlflow-artifacts:/")
    assert list((d / "mlflow" / "mlartifacts").rglob("a.txt"))


def test_cli_status_up_again_down_twice(live):
    d, _, pids = live
    runner = CliRunner()
    res = runner.invoke(stack_app, ["status", "--dir", str(d)])
    assert res.exit_code == 0 and res.output.count(" up ") == 3, res.output
    res = runner.invoke(stack_app, ["up", "--dir", str(d)])
    assert res.exit_code == 1 and "already runs" in res.output
    res = runner.invoke(stack_app, ["down", "--dir", str(d), "--grace", "5"])
    assert res.exit_code == 0 and "stopped" in res.output
    deadline = time.monotonic() + ceiling(10)
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if not gone(p)] == []
    assert not (d / "stack.json").exists() and not list(d.glob("*.pid"))
    res = runner.invoke(stack_app, ["down", "--dir", str(d)])
    assert res.exit_code == 0 and "nothing running" in res.output
    assert runner.invoke(stack_app, ["status", "--dir", str(d)]).exit_code == 1


def test_free_port_falls_back_when_busy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        port = stack.free_port(busy)
    assert port != busy and port > 0


def test_stop_kills_the_whole_group(tmp_path):
    """A process that ignores SIGTERM, and its child, are both gone after stop_all."""
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "time.sleep(60)")
    p = stack.spawn(tmp_path, "stubborn", [sys.executable, "-c", code], dict(os.environ))
    deadline = time.monotonic() + ceiling(10)
    while len(p.members()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [m.pid for m in p.members()]
    assert len(pids) == 2
    assert [x.name for x in stack.stop_all(tmp_path, grace=1)] == ["stubborn"]
    assert all(gone(pid) for pid in pids)
    assert stack.stop_all(tmp_path) == []


def test_failed_start_points_at_the_log(tmp_path):
    p = stack.spawn(tmp_path, "dies", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                    dict(os.environ), health="http://127.0.0.1:9/health")
    with pytest.raises(stack.StackError, match="dies exited before healthy") as e:
        stack.wait_healthy(p, timeout=20)
    assert p.log in str(e.value) and "boom" in str(e.value)
    stack.stop_all(tmp_path)


def test_prefect_yaml_deployments():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"sst2-nightly", "quickstart", "finetune"}
    nightly = deps["sst2-nightly"]
    assert nightly["entrypoint"] == "flows/benchmark.py:benchmark"
    assert nightly["parameters"] == {"config_path": "configs/sst2-gpt2.yaml"}
    assert nightly["work_pool"]["name"] == "gpu" and nightly["concurrency_limit"] == 1
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert deps["quickstart"]["work_pool"]["name"] == "local-process"
    assert deps["quickstart"]["parameters"] == {"config_path": "configs/quickstart.yaml"}
    assert deps["finetune"]["entrypoint"] == "flows/finetune.py:finetune"
    for d in deps.values():
        assert d["work_pool"]["job_variables"]["env"]["MLFLOW_TRACKING_URI"]
    step = doc["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $PEFT_BENCH_HOME }}"


def test_work_pool_templates_parse():
    process = json.loads((ROOT / "deploy/process-gpu.json").read_text())
    assert "CUDA_VISIBLE_DEVICES" in process["variables"]["properties"]["env"]["default"]
    docker = json.loads((ROOT / "deploy/docker-gpu.json").read_text())
    kwargs = docker["variables"]["properties"]["container_create_kwargs"]["default"]
    assert kwargs["device_requests"][0]["capabilities"] == [["gpu"]]
    k8s = json.loads((ROOT / "deploy/kubernetes-gpu.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    for tpl in (process, docker, k8s):  # every placeholder has a variable behind it
        text = json.dumps(tpl["job_configuration"])
        for var in tpl["variables"]["properties"]:
            text = text.replace("{{ %s }}" % var, "")
        assert "{{" not in text


def test_automations_parse_and_match_what_the_flow_emits():
    from prefect.events.schemas.automations import AutomationCore

    from tasks.common import names

    for path in ("deploy/crash-zombie-flow-runs.yaml", "deploy/notify-on-regression.yaml"):
        AutomationCore.model_validate(yaml.safe_load((ROOT / path).read_text()))
    notify = yaml.safe_load((ROOT / "deploy/notify-on-regression.yaml").read_text())
    assert notify["trigger"]["expect"] == [names.REGRESSION_EVENT]
    assert notify["trigger"]["match"]["prefect.resource.id"] == "peft-bench.benchmark.*"
    assert "event.payload.markdown" in notify["actions"][0]["body"]


def test_nightly_config_repeats_and_alarms():
    from tasks.config.build import load_config

    cfg = load_config(ROOT / "configs/sst2-gpt2.yaml")
    assert len(cfg.training.run_seeds) >= 3 and cfg.regression.enabled
    quick = load_config(ROOT / "configs/quickstart.yaml")
    assert len(quick.training.run_seeds) >= 2
