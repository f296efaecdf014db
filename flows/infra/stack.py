"""A local, loopback-only Prefect + MLflow stack: `peft-bench stack up | status | down`.

Everything lives under one folder (default `.stack/`):

    .stack/
      stack.json             ports, URLs, PIDs, timings (absent once `down` has run)
      env                    `source .stack/env` -> PREFECT_API_URL, MLFLOW_TRACKING_URI, ...
      prefect/               PREFECT_HOME of the stack (server database, profiles); never ~/.prefect
      mlflow/mlflow.db       MLflow backend store (sqlite)
      mlflow/mlartifacts/    MLflow served artifacts (`--artifacts-destination`)
      <name>.log, <name>.pid one pair per process: prefect-server, mlflow-server, worker-1, ...

Each process is started in its own session, so its PID is also its process-group id and
`down` stops its children (uvicorn, gunicorn, flow-run subprocesses) with it (flows/infra/
supervisor.py starts, waits for and stops them). The typer commands are in stack_cli.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import httpx
import psutil

from flows.infra import supervisor

HOST = "127.0.0.1"
DEFAULT_DIR = Path(".stack")
DEFAULT_POOL = os.environ.get("PEFT_BENCH_POOL", "local-process")
REPO_ROOT = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message names the log to read."""


@dataclass
class Proc:
    name: str
    pid: int
    log: str
    create_time: float
    url: Optional[str] = None
    port: Optional[int] = None
    health: Optional[str] = None

    @property
    def group(self) -> supervisor.Group:
        return supervisor.Group(self.pid, self.create_time)

    def members(self) -> list[psutil.Process]:
        """Live processes of this group, plus the leader's descendants that left it."""
        return self.group.members()

    def alive(self) -> bool:
        return bool(self.members())


# --------------------------------------------------------------------------- helpers
def _exe(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if found := (str(local) if local.exists() else shutil.which(name)):
        return found
    raise StackError(f"`{name}` not found next to {sys.executable} or on PATH")


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it can be bound on 127.0.0.1, else a free port chosen by the OS."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT ok
            try:
                s.bind((HOST, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise StackError("no free port on 127.0.0.1")


def prefect_env(stack_dir: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for Prefect processes of this stack: its own PREFECT_HOME, its own API."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_API_URL")}
    env["PREFECT_HOME"] = str((Path(stack_dir) / "prefect").resolve())
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def spawn(stack_dir: Path, name: str, argv: list[str], env: dict[str, str],
          url: str | None = None, port: int | None = None, health: str | None = None) -> Proc:
    """Start `argv` in a new session, output to <dir>/<name>.log, PID to <dir>/<name>.pid."""
    stack_dir = Path(stack_dir)
    stack_dir.mkdir(parents=True, exist_ok=True)
    log = (stack_dir / f"{name}.log").resolve()
    child = supervisor.start(argv, log, env=env, cwd=REPO_ROOT)
    (stack_dir / f"{name}.pid").write_text(f"{child.group.pid}\n")
    proc = Proc(name, child.group.pid, str(log), child.group.create_time, url, port, health)
    _record(stack_dir, proc)
    return proc


def wait_until(proc: Proc, ready: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll `ready()` until true; fail fast if the process died. Returns seconds waited."""
    try:
        return supervisor.wait_ready(ready, proc.alive, name=proc.name, log=proc.log, what=what,
                                     timeout=timeout, ignore=(httpx.HTTPError, OSError))
    except supervisor.NotReady as e:
        raise StackError(str(e)) from None


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


def wait_healthy(proc: Proc, timeout: float = 120) -> float:
    """Wait for `proc.health` to answer 200; returns seconds since the process started."""
    wait_until(proc, lambda: _http_ok(proc.health), "healthy", timeout)
    return round(time.time() - proc.create_time, 1)


def is_healthy(proc: Proc) -> Optional[bool]:
    try:
        return _http_ok(proc.health) if proc.health else None
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- start
def start_prefect_server(stack_dir: Path, port: int = 4200, timeout: float = 120,
                         ui: bool = True, wait: bool = True) -> Proc:
    """`prefect server start` on 127.0.0.1; returns once GET /api/health answers 200."""
    port = free_port(port)
    url = f"http://{HOST}:{port}"
    argv = [_exe("prefect"), "server", "start", "--host", HOST, "--port", str(port),
            "--ui" if ui else "--no-ui", "--analytics-off"]
    proc = spawn(stack_dir, "prefect-server", argv, prefect_env(stack_dir), url, port,
                 f"{url}/api/health")
    if wait:
        wait_healthy(proc, timeout)
    return proc


def start_mlflow_server(stack_dir: Path, port: int = 5000, timeout: float = 90,
                        backend_store_uri: str | None = None,
                        artifacts_destination: str | None = None, workers: int = 1,
                        wait: bool = True) -> Proc:
    """`mlflow server` with served artifacts on 127.0.0.1; returns once GET /health is 200."""
    port = free_port(port)
    url = f"http://{HOST}:{port}"
    data = (Path(stack_dir) / "mlflow").resolve()
    (data / "mlartifacts").mkdir(parents=True, exist_ok=True)
    argv = [_exe("mlflow"), "server", "--host", HOST, "--port", str(port),
            "--workers", str(workers),
            "--backend-store-uri", backend_store_uri or f"sqlite:///{data / 'mlflow.db'}",
            "--artifacts-destination", artifacts_destination or str(data / "mlartifacts")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The GenAI job runner (8 huey consumers) is not used by the benchmark; opt back in via env.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    proc = spawn(stack_dir, "mlflow-server", argv, env, url, port, f"{url}/health")
    if wait:
        wait_healthy(proc, timeout)
    return proc


def work_pool_exists(api_url: str, name: str) -> bool:
    return httpx.get(f"{api_url}/work_pools/{name}", timeout=10).status_code == 200


def create_work_pool(stack_dir: Path, api_url: str, name: str = DEFAULT_POOL,
                     pool_type: str = "process", base_job_template: Path | None = None) -> bool:
    """`prefect work-pool create NAME --type TYPE`; a no-op if it exists. True if created."""
    if work_pool_exists(api_url, name):
        return False
    args = ["work-pool", "create", name, "--type", pool_type]
    args += ["--base-job-template", str(base_job_template)] if base_job_template else []
    res = prefect_cli(stack_dir, *args, api_url=api_url)
    if res.returncode != 0 or not work_pool_exists(api_url, name):
        raise StackError(f"`prefect {' '.join(args)}` failed ({res.returncode}):\n"
                         f"{res.stdout}{res.stderr}")
    return True


ZOMBIE_AUTOMATION = REPO_ROOT / "deploy" / "crash-zombie-flow-runs.yaml"


def automation_exists(api_url: str, name: str) -> bool:
    r = httpx.post(f"{api_url}/automations/filter",
                   json={"automations": {"name": {"any_": [name]}}}, timeout=10)
    r.raise_for_status()
    return any(a["name"] == name for a in r.json())


def create_zombie_automation(api_url: str, path: Path = ZOMBIE_AUTOMATION,
                             within_s: float | None = None) -> bool:
    """As `prefect automation create --from-file deploy/crash-zombie-flow-runs.yaml`: flow runs
    that stop sending heartbeats (their worker or host died) are marked CRASHED by the server.
    A no-op if an automation of that name exists; True if created. `within_s` replaces the
    file's `within` (tests use a shorter one)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    if within_s is not None:
        spec["trigger"]["within"] = within_s
    if automation_exists(api_url, spec["name"]):
        return False
    from prefect.events.schemas.automations import AutomationCore

    # What `prefect automation create --from-file` does, without a second Python process.
    body = AutomationCore.model_validate(spec).model_dump(mode="json")
    r = httpx.post(f"{api_url}/automations/", json=body, timeout=10)
    if r.status_code >= 300:
        raise StackError(f"creating automation {spec['name']!r} from {path} failed: "
                         f"HTTP {r.status_code} {r.text[:500]}")
    return True


def prefect_cli(stack_dir: Path, *args: str, api_url: str | None = None,
                timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `prefect ARGS` against this stack (its API, its PREFECT_HOME) from the repo root."""
    api_url = api_url or read_state(Path(stack_dir))["prefect_api_url"]
    full_env = {**prefect_env(stack_dir, api_url), **(env or {})}
    return subprocess.run([_exe("prefect"), *args], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def worker_registered(api_url: str, pool: str, worker_name: str, since: float = 0) -> bool:
    """The pool lists the worker with a heartbeat at or after `since` (epoch seconds)."""
    r = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    beats = [datetime.fromisoformat(w["last_heartbeat_time"]).timestamp()
             for w in (r.json() if r.status_code == 200 else [])
             if w["name"] == worker_name and w.get("last_heartbeat_time")]
    return any(b >= since - 1 for b in beats)


def start_worker(stack_dir: Path, api_url: str, pool: str = DEFAULT_POOL, index: int = 1,
                 mlflow_url: str | None = None, timeout: float = 90, limit: int | None = None,
                 env: dict[str, str] | None = None) -> Proc:
    """`prefect worker start --pool POOL`; returns once the worker has registered with it.

    `limit`: at most that many flow runs at once on this worker (`--limit`), so that several
    workers of one pool share the runs instead of the first poller taking them all.
    `env`: extra environment for the worker and, through it, its flow runs (a deployment's
    `job_variables.env` still wins for the keys it sets)."""
    name = f"worker-{index}"
    worker_name = f"peft-bench-{name}"
    full_env = prefect_env(stack_dir, api_url)
    full_env.setdefault("PEFT_BENCH_HOME", str(REPO_ROOT))
    full_env["PEFT_BENCH_WORKER"] = worker_name  # flow runs inherit it: MLflow tags who ran what
    if mlflow_url:
        full_env["MLFLOW_TRACKING_URI"] = mlflow_url
    full_env.update(env or {})
    argv = [_exe("prefect"), "worker", "start", "--pool", pool, "--name", worker_name,
            "--type", "process", "--no-create-pool-if-not-found"]
    argv += ["--limit", str(limit)] if limit else []
    proc = spawn(stack_dir, name, argv, full_env)
    wait_until(proc, lambda: worker_registered(api_url, pool, worker_name, proc.create_time),
               "registered", timeout)
    return proc


# --------------------------------------------------------------------------- state
def read_state(stack_dir: Path) -> dict:
    path = Path(stack_dir) / "stack.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(stack_dir: Path, state: dict) -> None:
    stack_dir.mkdir(parents=True, exist_ok=True)
    tmp = stack_dir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(stack_dir / "stack.json")


def _record(stack_dir: Path, proc: Proc) -> None:
    """Record a PID as soon as it exists, so `down` can stop a half-started stack."""
    state = read_state(stack_dir)
    state.setdefault("procs", {})[proc.name] = asdict(proc)
    write_state(stack_dir, state)


def procs(stack_dir: Path) -> list[Proc]:
    """The processes recorded in <dir>/stack.json, running or not."""
    return [Proc(**p) for p in read_state(stack_dir).get("procs", {}).values()]


def stack_env(stack_dir: Path = DEFAULT_DIR) -> dict[str, str]:
    """What a shell (or a test's subprocess) needs to use the stack; also in <dir>/env."""
    state = read_state(stack_dir)
    return {"PREFECT_API_URL": state["prefect_api_url"], "MLFLOW_TRACKING_URI": state["mlflow_url"],
            "PEFT_BENCH_POOL": state["pool"],
            "PEFT_BENCH_HOME": os.environ.get("PEFT_BENCH_HOME", str(REPO_ROOT))}


def write_env_file(stack_dir: Path) -> Path:
    lines = [f"# peft-bench local stack: `source {stack_dir}/env`"]
    lines += [f"export {k}={v}" for k, v in stack_env(stack_dir).items()]
    path = Path(stack_dir) / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- up / down
def stack_up(stack_dir: Path = DEFAULT_DIR, prefect_port: int = 4200, mlflow_port: int = 5000,
             pool: str = DEFAULT_POOL, workers: int = 1, timeout: float = 120,
             ui: bool = True, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Servers, pool, workers; on any failure everything already started is stopped again."""
    stack_dir = Path(stack_dir)
    running = [p.name for p in procs(stack_dir) if p.alive()]
    if running:
        raise StackError(f"{stack_dir} already runs {running}; `peft-bench stack down` first")
    write_state(stack_dir, {"dir": str(stack_dir.resolve()), "pool": pool, "procs": {}})
    timings: dict[str, float] = {}
    try:  # both servers start at once; each is then waited for
        pf = start_prefect_server(stack_dir, prefect_port, timeout, ui, wait=False)
        ml = start_mlflow_server(stack_dir, 0 if mlflow_port == pf.port else mlflow_port,
                                 timeout, wait=False)
        for key, proc in (("prefect_server_s", pf), ("mlflow_server_s", ml)):
            timings[key] = wait_healthy(proc, timeout)
            echo(f"{proc.name:<15} {proc.url}  healthy after {timings[key]}s")
        api = f"{pf.url}/api"
        t = time.monotonic()
        created = create_work_pool(stack_dir, api, pool)
        timings["work_pool_s"] = round(time.monotonic() - t, 1)
        echo(f"work pool       {pool} ({'created' if created else 'exists'}, {timings['work_pool_s']}s)")
        t = time.monotonic()
        created = create_zombie_automation(api)
        timings["automation_s"] = round(time.monotonic() - t, 1)
        echo(f"automation      crash-zombie-flow-runs ({'created' if created else 'exists'}, "
             f"{timings['automation_s']}s)")
        for i in range(1, workers + 1):
            t = time.monotonic()
            w = start_worker(stack_dir, api, pool, i, ml.url, timeout)
            timings[f"{w.name}_s"] = round(time.monotonic() - t, 1)
            echo(f"{w.name:<15} pid {w.pid}  registered after {timings[f'{w.name}_s']}s")
    except BaseException:
        stop_all(stack_dir)
        raise
    state = read_state(stack_dir)
    state.update(prefect_url=pf.url, prefect_api_url=api, mlflow_url=ml.url,
                 ui_url=pf.url if ui else None, timings=timings)
    write_state(stack_dir, state)
    write_env_file(stack_dir)
    return state


def stop_procs(to_stop: list[Proc], grace: float = 10.0) -> None:
    """SIGTERM each process group, SIGKILL whatever is left after `grace` seconds."""
    supervisor.stop([p.group for p in to_stop], grace)


def stop_all(stack_dir: Path = DEFAULT_DIR, grace: float = 10.0) -> list[Proc]:
    """Stop workers first, then the servers; forget the PIDs. Safe to run twice."""
    stack_dir = Path(stack_dir)
    recorded = procs(stack_dir)
    workers = [p for p in recorded if p.name.startswith("worker-")]  # they talk to the server
    stop_procs(workers, grace)
    stop_procs([p for p in recorded if p not in workers], grace)
    for p in recorded:
        (stack_dir / f"{p.name}.pid").unlink(missing_ok=True)
    (stack_dir / "stack.json").unlink(missing_ok=True)
    return recorded


def stack_status(stack_dir: Path = DEFAULT_DIR) -> list[dict]:
    return [{"name": p.name, "pid": p.pid, "alive": p.alive(), "healthy": is_healthy(p),
             "url": p.url, "log": p.log} for p in procs(stack_dir)]
