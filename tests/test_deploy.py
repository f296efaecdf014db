"""Deployments for real: a Prefect server and an MLflow server on free loopback ports, the two
work pools of prefect.yaml, `prefect deploy` of `quickstart` and `finetune`, process workers,
and benchmark runs triggered with `prefect deployment run`; results read back from the
Prefect API and from the MLflow server. Then the faults: a bad config, an unreachable MLflow
server, workers and flow-run processes killed mid-method.

One stack for the module (~40-60 s to set up), torn down (every PID checked) even when a test
fails:

    pool local-process   worker-1                        benchmark (parent) flow runs
    pool gpu             worker-2, worker-3 (--limit 1)  finetune (child) flow runs

Sizes are tiny (64 train rows, 3 steps): every flow-run process still pays ~15 s of imports
(torch, transformers, mlflow) on this 2-core machine, so the module takes ~4.5-5 min.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import httpx
import psutil
import pytest
from _procs import kill_all, marked
from conftest import SESSION, ceiling
from mlflow.tracking import MlflowClient

from flows.infra import stack

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "peft-bench"  # mlflow.yaml
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ACTIVE = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"}
# The automation's window in this test: flow runs heart-beat every 30 s (prefect.yaml), so a
# dead run is marked CRASHED 15-50 s after it dies (deploy/ ships 90 s).
ZOMBIE_WITHIN_S = 45
KILL_SLOT = "gpu-kill"  # the concurrency slot of the kill test's runs
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2"}  # poll every 2 s, not 10
SMALL = ["data.train_size=64", "data.eval_size=32", "data.max_length=32",
         "training.max_steps=3", "training.eval_every=null", "training.num_threads=1",
         "training.seeds=[1]",
         "tracking.system_metrics_interval_s=1"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Live:
    dir: Path
    api: str
    mlflow: str
    model: Path
    reports: Path
    pids: set[int] = field(default_factory=set)
    workers: dict[str, stack.Proc] = field(default_factory=dict)
    early: dict[str, str] = field(default_factory=dict)  # fault runs started during setup

    # ------------------------------------------------------------------ Prefect
    def cli(self, *args: str, env: dict | None = None, timeout: float = 120):
        res = stack.prefect_cli(self.dir, *args, api_url=self.api, env=env, timeout=timeout)
        assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
        return res

    def trigger(self, overrides: list[str], methods: list[str] | None = None,
                job_env: dict | None = None) -> str:
        """`prefect deployment run 'benchmark/quickstart' --param ...`; the flow run id."""
        args = ["deployment", "run", "benchmark/quickstart",
                "--param", f"overrides={json.dumps(overrides)}"]
        if methods:
            args += ["--param", f"methods={json.dumps(methods)}"]
        if job_env:
            args += ["--job-variable", f"env={json.dumps(job_env)}"]
        out = self.cli(*args).stdout
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def small(self, *extra: str) -> list[str]:
        return [*SMALL, f"model.name_or_path={self.model}", f"report.output_dir={self.reports}",
                *extra]

    def flow_run(self, fid: str) -> dict:
        r = httpx.get(f"{self.api}/flow_runs/{fid}", timeout=10)
        r.raise_for_status()
        return r.json()

    def wait(self, fid: str, timeout: float, states=FINAL) -> dict:
        """Until the flow run reaches one of `states`; `timeout` (scaled by the machine's
        speed) only catches a hang."""
        limit = ceiling(timeout)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            run = self.flow_run(fid)
            if run["state_type"] in states:
                return run
            time.sleep(1)
        pytest.fail(f"flow run {fid} still {run['state_type']} after {limit:.0f}s; logs:\n"
                    + "\n".join(self.logs(fid)[-30:]))

    def logs(self, fid: str) -> list[str]:
        r = httpx.post(f"{self.api}/logs/filter", timeout=10, json={
            "logs": {"flow_run_id": {"any_": [fid]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
        r.raise_for_status()
        return [rec["message"] for rec in r.json()]

    def wait_log(self, fid: str, text: str, timeout: float = 15) -> str:
        """Logs reach the API in batches: wait for `text` a little."""
        deadline = time.monotonic() + ceiling(timeout)
        while True:
            joined = "\n".join(self.logs(fid))
            if text in joined or time.monotonic() > deadline:
                return joined
            time.sleep(1)

    def start_worker(self, index: int, pool: str, limit: int | None = None) -> stack.Proc:
        w = stack.start_worker(self.dir, self.api, pool, index, limit=limit, env=WORKER_ENV)
        self.workers[f"peft-bench-worker-{index}"] = w
        self.pids.update(m.pid for m in w.members())
        return w

    def unfinished(self) -> list[dict]:
        r = httpx.post(f"{self.api}/flow_runs/filter", timeout=10, json={"flow_runs": {
            "state": {"type": {"any_": sorted(ACTIVE)}}}})
        r.raise_for_status()
        return r.json()

    def stop_flow_runs(self, keep: set[str] = frozenset()) -> list[str]:
        """Kill the processes of every unfinished flow run (but `keep`) and cancel it through
        the API, so that nothing a test started trains on into the next test. Prefect starts
        each flow run in a session of its own, and a killed worker's runs are re-parented:
        their environment, not our process tree, finds them. Returns what was stopped."""
        left = [r for r in self.unfinished() if r["id"] not in keep]
        for run in left:
            kill_all(marked(SESSION, {"PREFECT__FLOW_RUN_ID": run["id"]}))
            httpx.post(f"{self.api}/flow_runs/{run['id']}/set_state", timeout=10, json={
                "state": {"type": "CANCELLED", "name": "Cancelled",
                          "message": "stopped by the test's teardown"}, "force": True})
        return [f"{r['name']} {r['id']} ({r['state_type']})" for r in left]

    def note_pids(self) -> None:
        for w in self.workers.values():
            self.pids.update(m.pid for m in w.members())

    # ------------------------------------------------------------------ MLflow
    def mlflow_client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow)

    def runs(self, where: str) -> list:
        c = self.mlflow_client()
        exp = c.get_experiment_by_name(EXPERIMENT)
        return c.search_runs([exp.experiment_id], where) if exp else []

    def parent_run(self, fid: str):
        runs = self.runs(f"tags.`prefect.flow_run_id` = '{fid}' "
                         "and tags.`peft_bench.role` = 'parent'")
        assert len(runs) == 1, f"{len(runs)} MLflow parent runs for flow run {fid}"
        return runs[0]

    def children(self, parent_run_id: str) -> dict:
        return {r.data.tags["peft_bench.method"]: r
                for r in self.runs(f"tags.mlflow.parentRunId = '{parent_run_id}'")}


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy-stack")
    reports = tmp_path_factory.mktemp("deploy-reports")
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    lv = None
    stack.write_state(d, {"dir": str(d), "pool": "local-process", "procs": {}})
    try:
        pf = stack.start_prefect_server(d, port=0, ui=False, wait=False)
        ml = stack.start_mlflow_server(d, port=0, wait=False)
        model = request.getfixturevalue("tiny_model_dir")  # built while the servers boot
        request.getfixturevalue("sst2_dir")
        for p in (pf, ml):
            stack.wait_healthy(p, timeout=120)
        api = f"{pf.url}/api"
        lv = Live(d, api, ml.url, model, reports)
        lv.pids.update(m.pid for p in (pf, ml) for m in p.members())
        state = stack.read_state(d)
        state.update(prefect_url=pf.url, prefect_api_url=api, mlflow_url=ml.url)
        stack.write_state(d, state)
        timings["servers_s"] = round(time.monotonic() - t0, 1)

        t = time.monotonic()
        stack.create_work_pool(d, api, "local-process")
        stack.create_work_pool(d, api, "gpu", base_job_template=ROOT / "deploy/process-gpu.json")
        stack.create_zombie_automation(api, within_s=ZOMBIE_WITHIN_S)
        timings["pools_s"] = round(time.monotonic() - t, 1)

        # The real CLI, as docs/deploy.md gives it: MLFLOW_TRACKING_URI and PEFT_BENCH_HOME
        # are templated into the deployments from this environment. It imports the flows
        # (~12 s), so the workers start meanwhile.
        t = time.monotonic()
        deploy_env = {"MLFLOW_TRACKING_URI": ml.url, "PEFT_BENCH_HOME": str(ROOT)}
        with ThreadPoolExecutor(1) as pool:
            deploying = pool.submit(stack.prefect_cli, d, "deploy", "--no-prompt",
                                    "-n", "quickstart", "-n", "finetune",
                                    api_url=api, env=deploy_env, timeout=300)
            lv.start_worker(1, "local-process")
            lv.start_worker(2, "gpu", limit=1)
            lv.start_worker(3, "gpu", limit=1)
            res = deploying.result()
        assert res.returncode == 0, res.stdout + res.stderr
        timings["deploy_and_workers_s"] = round(time.monotonic() - t, 1)

        # The two fault runs are cheap but each flow-run process spends ~15 s importing: start
        # them now so they run alongside the first test; their tests only check the outcome.
        lv.early["invalid"] = lv.trigger(["training.lr=-1"])
        lv.early["unreachable"] = lv.trigger(
            lv.small(), methods=["lora"],
            job_env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack.free_port()}"})
        timings["setup_s"] = round(time.monotonic() - t0, 1)
        print(f"\ndeploy stack: {timings}")
        yield lv
    finally:
        if lv is not None:
            lv.note_pids()
            lv.stop_flow_runs()
        stopped = stack.stop_all(d, grace=5)
        pids = (lv.pids if lv else set()) | {p.pid for p in stopped}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(p) for p in pids):
            time.sleep(0.2)
        left = [p for p in pids if not gone(p)]
        for pid in left:  # never leave a process behind, whatever failed above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"deploy stack: {len(pids)} processes stopped; module took "
              f"{time.monotonic() - t0:.0f}s")
        assert not left, f"still running after stop_all: {left}"
        assert all(gone(p) for p in pids)


@pytest.fixture(autouse=True)
def no_flow_run_outlives_its_test(live):
    """Also when the test fails: every flow run it started is finished, or killed and
    cancelled here (the fault runs started during set-up are left to their own tests)."""
    yield
    left = live.stop_flow_runs(keep=set(live.early.values()))
    assert not left, f"flow runs still unfinished after the test (killed, cancelled): {left}"


# ---------------------------------------------------------------------------------- runs
def test_quickstart_deployment_runs_on_a_worker(live):
    dep = httpx.get(f"{live.api}/deployments/name/benchmark/quickstart", timeout=10).json()
    assert dep["work_pool_name"] == "local-process"
    assert dep["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == live.mlflow  # templated
    assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(ROOT)}
    fin = httpx.get(f"{live.api}/deployments/name/finetune/finetune", timeout=10).json()
    assert fin["work_pool_name"] == "gpu"

    # data.source stays the config's relative ../shared/data/sst2: the pull step's cwd.
    fid = live.trigger(live.small())
    run = live.wait(fid, timeout=180)
    assert run["state_type"] == "COMPLETED", "\n".join(live.logs(fid)[-30:])

    parent = live.parent_run(fid)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["peft_bench.failed_methods"] == ""
    assert parent.data.tags["peft_bench.worker"] == "peft-bench-worker-1"
    kids = live.children(parent.info.run_id)
    assert sorted(kids) == ["dora", "full", "lora", "qlora"]
    for name, r in kids.items():
        assert r.info.status == "FINISHED", name
        for key in ("eval/accuracy", "train_time_s", "peak_memory_mb", "trainable_params"):
            assert key in r.data.metrics, (name, key)
        assert r.data.metrics["train_steps"] == 3
    client = live.mlflow_client()
    md = Path(client.download_artifacts(parent.info.run_id, "report/report.md",
                                        str(live.reports / "download")))
    text = md.read_text()
    assert all(m in text for m in ("full", "lora", "dora", "qlora"))
    # Artifacts went through the server (served artifacts), into the stack's folder.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list((live.dir / "mlflow" / "mlartifacts").rglob("report.md"))


# -------------------------------------------------------------------------------- faults
def test_invalid_config_fails_at_once_with_the_reason_in_the_logs(live):
    fid = live.early["invalid"]  # overrides=["training.lr=-1"], started during setup
    run = live.wait(fid, timeout=120)
    assert run["state_type"] == "FAILED"
    took = _ts(run["end_time"]) - _ts(run["start_time"])
    print(f"\ninvalid config: FAILED {took:.1f}s after the flow run started")
    assert took < ceiling(10), f"{took:.1f}s from start to FAILED"
    logs = live.wait_log(fid, "training.lr: Input should be greater than 0")
    assert "training.lr: Input should be greater than 0" in logs
    assert not live.runs(f"tags.`prefect.flow_run_id` = '{fid}'")  # no MLflow run


def test_unreachable_mlflow_fails_fast_before_training(live):
    fid = live.early["unreachable"]  # job env MLFLOW_TRACKING_URI -> a closed loopback port
    run = live.wait(fid, timeout=150)
    assert run["state_type"] == "FAILED"
    took = _ts(run["end_time"]) - _ts(run["start_time"])
    print(f"\nunreachable MLflow: FAILED {took:.1f}s after the flow run started")
    # 20 s of it are the preflight's patience with a server that may still be starting.
    assert took < 20 + ceiling(30), f"{took:.1f}s from start to FAILED"
    logs = live.wait_log(fid, "is unreachable")
    assert re.search(r"ConnectionError: tracking\.tracking_uri: MLflow server "
                     r"http://127\.0\.0\.1:\d+ is unreachable", logs), logs[-2000:]
    assert "MLflow parent run" not in logs  # failed in the preflight, before any run
    assert not live.runs(f"tags.`prefect.flow_run_id` = '{fid}'")


def test_parent_marks_a_silent_child_crashed(live):
    """The fallback for servers without the zombie automation: a child RUNNING with no
    heartbeat is marked CRASHED by the waiting parent, whose caller then fails its MLflow run.
    (A run created here by hand: nothing runs behind it.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.orchestration import dispatch
    from tasks.config.schema import TrackingConfig
    from tasks.tracking import runs as tracking

    flow_id = _post(f"{live.api}/flows/", {"name": "silent-child"}).json()["id"]
    fid = _post(f"{live.api}/flow_runs/", {"flow_id": flow_id, "name": "silent"}).json()["id"]
    _post(f"{live.api}/flow_runs/{fid}/set_state",
          {"state": {"type": "RUNNING", "name": "Running"}, "force": True})
    tr = TrackingConfig(tracking_uri=live.mlflow, experiment="silent-child")
    c = MlflowClient(live.mlflow)
    mlrun = c.create_run(c.create_experiment("silent-child"),
                         tags={"prefect.flow_run_id": fid}).info.run_id

    t = time.monotonic()
    with temporary_settings({PREFECT_API_URL: live.api}):
        done = dispatch.wait_all({"m": UUID(fid)}, stale_after=3)
    assert time.monotonic() - t < ceiling(15)
    assert done["m"].state.type.value == "CRASHED"
    assert "no heartbeat" in done["m"].state.message
    assert tracking.fail_open_runs(tr, fid, done["m"].state.message) == [mlrun]
    assert c.get_run(mlrun).info.status == "FAILED"


def test_killed_processes_leave_crashed_runs_and_failed_mlflow_runs(live):
    """Three ways to die mid-method, all while training (each run would train for hours):

    A  a GPU-pool worker gets SIGKILL on its process group. Prefect 3.9 starts each flow run in
       a session of its own, so the flow run survives its worker, but its output pipe is
       broken: its next write ends it. CRASHED; its own on_crashed hook fails its MLflow run.
    B  the other GPU-pool worker and its flow run get SIGKILL (the host died). Nothing reports:
       the run stops sending heartbeats and the server's automation marks it CRASHED; the
       waiting benchmark parent fails its MLflow run.
    C  a `dispatch: local` benchmark's flow-run process alone gets SIGKILL (the OOM killer):
       its worker reports it CRASHED at once and runs the benchmark's on_crashed hook, which
       fails the parent MLflow run and the child run of the method in training, and marks
       its in-process child flow run (no heartbeats) CRASHED in Prefect.

    A and B are one `dispatch: deployments` benchmark (one method per worker), which writes
    its report and ends FAILED: every run failed. The workers are restarted for the next test."""
    # Their own slot, room for all three: the slots of killed runs stay taken until their
    # leases run out (test_slots_of_killed_runs_come_back).
    slot = [f"concurrency.slot={KILL_SLOT}", "concurrency.limit=3", "training.max_steps=100000"]
    fan = live.trigger(live.small(*slot, "dispatch=deployments"), methods=["lora", "dora"])
    solo = live.trigger(live.small(*slot), methods=["full"])
    killed: dict[str, float] = {}  # case -> epoch seconds of the SIGKILL
    fan_kids: dict = {}
    limit = ceiling(200)  # only a hang: the event waited for is "every run is training"
    deadline = time.monotonic() + limit
    try:
        while len(killed) < 3:
            assert time.monotonic() < deadline, f"not all training after {limit:.0f}s: {fan_kids}"
            for fid, case in ((fan, "A"), (solo, "C")):
                if case not in killed:
                    assert live.flow_run(fid)["state_type"] not in FINAL, live.logs(fid)[-20:]
            live.note_pids()
            if "C" not in killed and _training(live, solo, 1):
                proc = _flow_run_process(live.workers["peft-bench-worker-1"], solo)
                proc.send_signal(signal.SIGKILL)
                killed["C"] = time.time()
            if "A" not in killed and (fan_kids := _training(live, fan, 2)):
                (a_name, a_run), (b_name, b_run) = sorted(fan_kids.items())
                wa = live.workers[a_run.data.tags["peft_bench.worker"]]
                wb = live.workers[b_run.data.tags["peft_bench.worker"]]
                assert wa is not wb, "both methods on one worker: --limit 1 not honoured"
                os.killpg(wa.pid, signal.SIGKILL)  # A: the worker's process group only
                killed["A"] = time.time()
                for m in wb.members():  # B: the worker and the flow run it started
                    with contextlib.suppress(psutil.Error):
                        m.send_signal(signal.SIGKILL)
                killed["B"] = time.time()
                for w in (wa, wb):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(w.pid, 0)
            time.sleep(1)

        child = {n: r.data.tags["prefect.flow_run_id"] for n, r in fan_kids.items()}
        took = {}
        for case, fid in (("C", solo), ("A", child[a_name]), ("B", child[b_name])):
            run = live.wait(fid, timeout=120)
            took[case] = round(_ts(run["end_time"]) - killed[case], 1)
            assert run["state_type"] == "CRASHED", (case, run["state"])
            took[case + " message"] = run["state"]["message"][:70]
        print(f"\nCRASHED after (s): {took}")
        assert "SIGKILL" in live.flow_run(solo)["state"]["message"]
        # B: by the automation (its message; the parent's fallback would say "no heartbeat")
        assert "stopped sending heartbeats" in live.flow_run(child[b_name])["state"]["message"]

        # C: the worker ran the benchmark's on_crashed hook (it imports the flow: ~15 s).
        solo_parent = live.parent_run(solo).info.run_id
        solo_kids = [r.info.run_id for r in live.children(solo_parent).values()]
        runs = _wait_closed(live, [solo_parent, *solo_kids], timeout=90)
        assert len(runs) == 2
        for r in runs:
            assert r.info.status == "FAILED", (r.info.run_name, r.info.status)
            assert r.data.tags["peft_bench.error"].startswith("flow run Crashed"), r.data.tags
        # ... and its in-process child flow run, which sends no heartbeats, CRASHED in Prefect.
        solo_child = live.children(solo_parent)["full"].data.tags["prefect.flow_run_id"]
        child_run = live.wait(solo_child, timeout=60)
        assert child_run["state_type"] == "CRASHED", child_run["state"]
        assert child_run["state"]["message"].startswith("its parent flow run Crashed")

        # A, B: the parent went on, closed what was left, reported, and failed: no run finished.
        assert live.wait(fan, timeout=90)["state_type"] == "FAILED"
        pr = live.parent_run(fan)
        assert pr.info.status == "FAILED"
        assert pr.data.tags["peft_bench.error"].startswith("AllRunsFailed: every run failed")
        assert pr.data.tags["peft_bench.failed_methods"] == ",".join(sorted(fan_kids))
        assert live.mlflow_client().list_artifacts(pr.info.run_id, "report")
        kids = _wait_closed(live, [r.info.run_id for r in live.children(pr.info.run_id).values()],
                            timeout=30)
        assert len(kids) == 2
        for r in kids:
            assert r.info.status == "FAILED", r.info.run_name
            assert r.data.tags["peft_bench.error"], r.info.run_name
    finally:
        if "A" in killed:  # the next test needs both GPU-pool workers again
            live.start_worker(2, "gpu", limit=1)
            live.start_worker(3, "gpu", limit=1)


def test_fan_out_to_two_workers_and_rerun_after_the_kill(live):
    """`dispatch: deployments`: two methods x two seeds, four finetune flow runs, spread over
    the two GPU-pool workers (restarted after the previous test: re-running works)."""
    fid = live.trigger(live.small("dispatch=deployments", "concurrency.limit=2",
                                  "training.seeds=[1,2]"), methods=["full", "lora"])
    run = live.wait(fid, timeout=240)
    assert run["state_type"] == "COMPLETED", "\n".join(live.logs(fid)[-30:])
    parent = live.parent_run(fid)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["peft_bench.failed_methods"] == ""
    runs = live.runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((r.data.tags["peft_bench.method"], r.data.tags["peft_bench.seed"])
                  for r in runs) == [("full", "1"), ("full", "2"), ("lora", "1"), ("lora", "2")]
    kids = {r.info.run_id: r for r in runs}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    flow_runs = {r.data.tags["prefect.flow_run_id"] for r in kids.values()}
    assert len(flow_runs) == 4 and fid not in flow_runs  # one flow run per (method, seed)
    aggregates = live.runs(f"tags.`peft_bench.benchmark_run` = '{parent.info.run_id}'")
    assert sorted(r.data.metrics["n_seeds"] for r in aggregates) == [2, 2]
    for child in flow_runs:
        fr = live.flow_run(child)
        assert fr["state_type"] == "COMPLETED"
        dep = httpx.get(f"{live.api}/deployments/{fr['deployment_id']}", timeout=10).json()
        assert dep["name"] == "finetune"
    workers = {r.data.tags["peft_bench.worker"] for r in kids.values()}
    assert workers == {"peft-bench-worker-2", "peft-bench-worker-3"}, workers


def test_toy_sweep_fans_out_over_two_workers(live):
    """A sweep with `dispatch: deployments`: 2 methods x 2 grid points, then the chosen points
    under 2 seeds on the test split: 8 finetune flow runs over the two GPU-pool workers."""
    fid = live.trigger(live.small("dispatch=deployments", "concurrency.limit=2",
                                  "training.seeds=[1,2]", "sweep.grid.lr=[0.001,0.003]",
                                  "data.test_split=test", "data.test_size=32"),
                       methods=["full", "lora"])
    run = live.wait(fid, timeout=360)
    assert run["state_type"] == "COMPLETED", "\n".join(live.logs(fid)[-30:])
    parent = live.parent_run(fid)
    methods = {r.data.tags["peft_bench.method"]: r for r in
               live.runs(f"tags.`peft_bench.benchmark_run` = '{parent.info.run_id}'")}
    grid = [g for m in methods.values()
            for g in live.runs(f"tags.mlflow.parentRunId = '{m.info.run_id}'")]
    assert sorted((g.data.tags["peft_bench.method"], g.data.tags["peft_bench.point"])
                  for g in grid) == [("full", "lr=0.001"), ("full", "lr=0.003"),
                                     ("lora", "lr=0.001"), ("lora", "lr=0.003")]
    finals = live.runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(finals) == 4 and {r.info.status for r in grid + finals} == {"FINISHED"}
    assert {r.data.tags["peft_bench.eval_split"] for r in finals} == {"test"}
    for name, m in methods.items():
        chosen = m.data.tags["peft_bench.chosen_point"]
        assert {r.data.tags["peft_bench.point_json"] for r in finals
                if r.data.tags["peft_bench.method"] == name} == {chosen}
    flow_runs = {r.data.tags["prefect.flow_run_id"] for r in grid + finals}
    assert len(flow_runs) == 8
    workers = {r.data.tags["peft_bench.worker"] for r in grid + finals}
    assert workers == {"peft-bench-worker-2", "peft-bench-worker-3"}, workers


def test_slots_of_killed_runs_come_back(live):
    """The killed runs (B, C) held slots of their concurrency limit; nothing released them.
    Their leases (60 s, flows/finetune.py) run out and the server takes the slots back."""
    deadline = time.monotonic() + ceiling(90)
    while True:
        r = httpx.get(f"{live.api}/v2/concurrency_limits/{KILL_SLOT}", timeout=10)
        r.raise_for_status()
        if r.json()["active_slots"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.json()["active_slots"] == 0, r.json()


# ---------------------------------------------------------------------------------- helpers
def _training(live: Live, fid: str, n: int) -> dict:
    """The MLflow child runs of benchmark flow run `fid` once all `n` are RUNNING with a
    logged training loss, else {}."""
    try:
        kids = live.children(live.parent_run(fid).info.run_id)
    except AssertionError:  # no parent run yet
        return {}
    ok = len(kids) == n and all(r.info.status == "RUNNING" and "train/loss" in r.data.metrics
                                for r in kids.values())
    return kids if ok else {}


def _flow_run_process(worker: stack.Proc, fid: str) -> psutil.Process:
    for p in worker.members():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("PREFECT__FLOW_RUN_ID") == fid:
                return p
    pytest.fail(f"no process of flow run {fid} under {worker.name}")


def _wait_closed(live: Live, run_ids: list[str], timeout: float) -> list:
    client = live.mlflow_client()
    deadline = time.monotonic() + ceiling(timeout)
    while True:
        runs = [client.get_run(r) for r in run_ids]
        if all(r.info.status != "RUNNING" for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def _post(url: str, body: dict) -> httpx.Response:
    """A POST to the Prefect API that a loaded server may answer late or with a transient 5xx
    (its sqlite busy: a suite run beside other work once got a body without "id"): retried
    until a ceiling, and a refusal names its status and body."""
    deadline, r = time.monotonic() + ceiling(60), None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, timeout=ceiling(10))
        except httpx.TransportError:
            time.sleep(1)
            continue
        if r.status_code < 500:
            break
        time.sleep(1)
    assert r is not None and r.status_code in (200, 201), (url, r and r.status_code,
                                                           r and r.text[:500])
    return r


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
