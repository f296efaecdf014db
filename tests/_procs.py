"""What the suite starts, and that it stops: a marker in the environment of every process the
test session starts, a ceiling scaled by the machine's measured speed, and process-tree kills.

Every process the suite starts inherits `PEFT_BENCH_TEST_SESSION` (set in conftest before any
test runs), also those that leave our process tree: Prefect starts each flow run in a session of
its own, and a killed worker's flow run is re-parented to init. Scanning the process table for
the marker finds them all, which a walk of our children cannot.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable

import psutil

MARKER = "PEFT_BENCH_TEST_SESSION"

# Seconds the speed probe below takes on a quiet machine of this project's kind (2 cores).
_PROBE_QUIET_S = 0.34


def _environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def marked(session: str, where: dict | None = None) -> list[psutil.Process]:
    """Live processes (not zombies, not this one) that carry this session's marker and, with
    `where`, every given environment value (e.g. {"PREFECT__FLOW_RUN_ID": fid})."""
    found = []
    for p in psutil.process_iter(["status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        env = _environ(p)
        if env.get(MARKER) == session and all(env.get(k) == v for k, v in (where or {}).items()):
            found.append(p)
    return found


def kill_all(procs: Iterable[psutil.Process], timeout: float = 10) -> list[psutil.Process]:
    """SIGKILL the processes and their descendants; wait for them. Returns those that were
    alive when called."""
    victims: dict[int, psutil.Process] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            victims.update({c.pid: c for c in p.children(recursive=True)})
            victims[p.pid] = p
    for p in victims.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(victims.values()), timeout=timeout)
    return list(victims.values())


def clock_offset() -> float:
    """psutil's create_time minus time.time() for a process started now: psutil counts from a
    boot time rounded to the second, so the two clocks differ by up to a second."""
    import subprocess

    t = time.time()
    child = subprocess.Popen(["true"])
    born = psutil.Process(child.pid).create_time()
    child.wait()
    return born - t


def describe(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())[:160]
        age = time.time() - p.create_time()
        return f"pid {p.pid} ({age:.0f}s old): {cmd}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def speed_factor() -> float:
    """How much slower than a quiet machine this one runs now: a fixed single-threaded workload
    (Python and a small matmul) timed three times, the best taken, divided by its quiet time.
    At least 1, at most 6: a ceiling never shrinks below its quiet value, and a machine six
    times slower than quiet is hung for this suite's purposes."""
    import torch

    a = torch.randn(192, 192)

    def probe() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(500):
                a @ a
        sum(i * i for i in range(4_000_000))
        return time.perf_counter() - t

    best = min(probe() for _ in range(3))
    return min(6.0, max(1.0, best / _PROBE_QUIET_S))
