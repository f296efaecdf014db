"""The temporary Prefect server of one `peft-bench run`, which never outlives it.

Without PREFECT_API_URL, Prefect starts a temporary server of its own in a subprocess and stops
it at exit; a CLI killed with SIGKILL leaves that server running for ever, and a busy machine
makes its fixed start-up wait time out. So the CLI starts the same server itself (uvicorn on
`prefect.server.api.server:create_app`, as Prefect does) with:

- a guard process (flows/infra/supervisor.py) that stops the server the moment the CLI dies,
  however it dies, SIGKILL included;
- a record in `<cache>/servers/<server pid>.json` (owner pid and start time); the next start
  stops any server whose owner is gone (should the guard itself have been killed);
- a start-up timeout (default 120 s, PEFT_BENCH_SERVER_TIMEOUT or --server-timeout) and one
  retry on a fresh port, then a clear `ServerStartError` naming the log.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import psutil

from flows.infra import supervisor
from flows.infra.stack import free_port
from flows.infra.supervisor import log_tail

DEFAULT_TIMEOUT_S = float(os.environ.get("PEFT_BENCH_SERVER_TIMEOUT", "120"))
_entered: list = []


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up; the message names its log."""


@dataclass
class TempServer:
    child: supervisor.Child
    url: str
    record: Path
    log: Path

    def stop(self) -> None:
        self.child.stop(grace=10)
        self.record.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)


def servers_dir() -> Path:
    from tasks.config.build import cache_root

    path = cache_root() / "servers"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def reap_orphans() -> list[int]:
    """Stop temporary servers whose owner process is gone; return their pids."""
    stopped = []
    for record in servers_dir().glob("*.json"):
        try:
            info = json.loads(record.read_text())
            owner_alive = _alive(info["owner_pid"], info["owner_started"])
            server = _alive(info["pid"], info["started"])
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if owner_alive:
            continue
        if server:
            supervisor.stop([supervisor.Group(info["pid"], info["started"])], grace=10)
            stopped.append(info["pid"])
        record.unlink(missing_ok=True)
    return stopped


def _alive(pid: int, started: float) -> bool:
    from tasks.tracking.owner import process_alive

    return bool(process_alive(pid, started))


def _spawn(port: int, log: Path) -> supervisor.Child:
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return supervisor.start(argv, log, env=env, guard=True)


def _point_prefect_at(api_url: str) -> None:
    """PREFECT_API_URL for this process and its children. Prefect reads its settings when it is
    imported: if it already is, its settings context is switched too, for good."""
    os.environ["PREFECT_API_URL"] = api_url
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        ctx = temporary_settings(updates={PREFECT_API_URL: api_url})
        ctx.__enter__()
        _entered.append(ctx)  # a context manager that is garbage-collected exits


def _wait_healthy(child: supervisor.Child, url: str, timeout_s: float) -> bool:
    with httpx.Client(timeout=5) as client, contextlib.suppress(supervisor.NotReady):
        supervisor.wait_ready(lambda: client.get(f"{url}/api/health").status_code == 200,
                              lambda: child.popen.poll() is None, name="the temporary server",
                              log=child.log, timeout=timeout_s, interval=0.25,
                              ignore=(httpx.HTTPError,))
        return True
    return False


def start(timeout_s: float = DEFAULT_TIMEOUT_S, tries: int = 2) -> TempServer:
    """Start the server (retrying once on a fresh port) and point this process at it."""
    folder = servers_dir()
    log = folder / f"server-{os.getpid()}.log"
    me = psutil.Process()
    for attempt in range(1, tries + 1):
        port = free_port()
        child = _spawn(port, log)
        url = f"http://127.0.0.1:{port}"
        record = folder / f"{child.group.pid}.json"
        record.write_text(json.dumps({"pid": child.group.pid, "started": child.group.create_time,
                                      "owner_pid": me.pid, "owner_started": me.create_time(),
                                      "url": url}))
        server = TempServer(child, url, record, log)
        if _wait_healthy(child, url, timeout_s):
            _point_prefect_at(f"{url}/api")
            atexit.register(server.stop)
            return server
        tail = log_tail(log, 10)
        server.stop()
        log.write_text(tail)  # kept for the error message
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout_s:.0f} s ({tries} tries); "
        f"the machine may be overloaded. Raise --server-timeout (or PEFT_BENCH_SERVER_TIMEOUT), "
        f"or run one with `prefect server start` / `peft-bench stack up` and set PREFECT_API_URL. "
        f"The end of its log ({log}):\n{log_tail(log, 10)}")


def _profile_api_url() -> Optional[str]:
    """PREFECT_API_URL of the active Prefect profile, read without importing Prefect (whose
    settings, once imported, would not see the URL this module sets)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no profile reading; PREFECT_API_URL still counts
        return None
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or doc.get("active", "ephemeral")
    return (doc.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")


def needed() -> bool:
    """No Prefect API is configured: not in PREFECT_API_URL, not in the active profile and
    (if Prefect is already imported, as under a test harness) not in its settings."""
    if os.environ.get("PREFECT_API_URL") or _profile_api_url():
        return False
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        return not get_current_settings().api.url
    return True


def ensure(timeout_s: Optional[float] = None) -> Optional[TempServer]:
    reap_orphans()
    if not needed():
        return None
    return start(timeout_s or DEFAULT_TIMEOUT_S)
