"""Who holds an open MLflow run: `peft_bench.owner = host:pid:start-time` of the process
that works on it, and whether that process still runs (the start time tells it from a new
process that reused the pid). No MLflow here: the run layer tags with it, the lifecycle closes
runs whose owner is gone."""
from __future__ import annotations

import socket
from typing import Optional

import psutil


def owner_tag() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def process_alive(pid: int, started: float) -> Optional[bool]:
    """Whether the process `pid` that started at `started` (epoch seconds) still runs: the
    start time tells it from a new process that reused the pid. None when it cannot be told."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


def owner_alive(tag: str) -> Optional[bool]:
    """True or False for an owner on this host; None for another host or a malformed tag."""
    try:
        host, pid, started = tag.rsplit(":", 2)
        pid_i, started_f = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return process_alive(pid_i, started_f)
