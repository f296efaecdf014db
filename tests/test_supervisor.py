"""flows/infra/supervisor.py with real processes: readiness with a deadline, a stop that reaches a
child that ignores SIGTERM and its grandchildren, and a guard that stops the child when its
parent is SIGKILLed. Each test waits for events (a file, a pid gone) under a ceiling and kills
whatever it started, even when it fails."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import ceiling

from flows.infra import supervisor

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def handles(pids) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid))
    return out


def kill(procs) -> None:
    """Teardown: SIGKILL what is left (psutil checks the pid was not reused) and reap it."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def pidfds(pid: int) -> int:
    """How many pidfds the process holds open: the guard's two mean it waits in select()."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
    return n


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture
def started():
    """Children started by a test; stopped (group and guard) whatever the test did."""
    children: list[supervisor.Child] = []
    yield children
    for c in children:
        kill(c.group.members() + handles([c.popen.pid]) + handles([c.guard.pid] if c.guard else []))
        c.popen.poll()
        if c.guard is not None:
            c.guard.poll()


# ------------------------------------------------------------------ wait_ready
@pytest.mark.timeout(120)
def test_a_child_that_becomes_healthy_is_reported_healthy(tmp_path, started):
    flag = tmp_path / "ready"
    code = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(300)"
    child = supervisor.start([PY, "-c", code, str(flag)], tmp_path / "c.log")
    started.append(child)
    took = supervisor.wait_ready(flag.exists, child.group.alive, name="c", log=child.log,
                                 timeout=ceiling(30), interval=0.05)
    assert flag.exists() and 0 <= took < ceiling(30)
    assert child.popen.poll() is None


@pytest.mark.timeout(120)
def test_a_child_that_exits_first_fails_fast_with_its_log_tail(tmp_path, started):
    code = "print('boom: no config here', flush=True); raise SystemExit(3)"
    child = supervisor.start([PY, "-c", code], tmp_path / "dies.log")
    started.append(child)
    t = time.monotonic()
    with pytest.raises(supervisor.NotReady) as err:
        supervisor.wait_ready(lambda: False, child.group.alive, name="dies", log=child.log,
                              timeout=ceiling(40))
    assert time.monotonic() - t < ceiling(15)  # not the whole deadline
    assert err.value.exited and "dies exited before healthy" in str(err.value)
    assert str(child.log) in str(err.value) and "boom: no config here" in str(err.value)


@pytest.mark.timeout(120)
def test_the_deadline_is_honoured(tmp_path, started):
    child = supervisor.start([PY, "-c", "import time; time.sleep(300)"], tmp_path / "slow.log")
    started.append(child)
    polls = []

    def never() -> bool:
        polls.append(1)
        raise ConnectionRefusedError  # an OSError: counts as not ready, is not raised
    t = time.monotonic()
    with pytest.raises(supervisor.NotReady) as err:
        supervisor.wait_ready(never, child.group.alive, name="slow", log=child.log, timeout=1.0,
                              interval=0.1, what="registered")
    took = time.monotonic() - t
    assert 1.0 <= took < 1.0 + ceiling(3), took
    assert not err.value.exited and "slow not registered after 1s" in str(err.value)
    assert len(polls) > 2 and child.popen.poll() is None


# ------------------------------------------------------------------ stop
STUBBORN = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sleeper = [sys.executable, "-c", "import signal, time; "
               "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"]
    kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump([k.pid for k in kids], f)
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(300)
""")


@pytest.mark.timeout(120)
def test_stop_kills_a_child_that_ignores_sigterm_and_its_grandchildren(tmp_path, started):
    """One grandchild in the child's group, one that left it for a session of its own."""
    pids_file = tmp_path / "kids.json"
    child = supervisor.start([PY, "-c", STUBBORN, str(pids_file)], tmp_path / "stubborn.log")
    started.append(child)
    all_procs = handles([child.popen.pid])
    try:
        assert wait_for(pids_file.is_file, ceiling(20)), supervisor.log_tail(child.log)
        all_procs += handles(read_json(pids_file))
        assert len(all_procs) == 3 and not any(gone(p) for p in all_procs)
        t = time.monotonic()
        supervisor.stop([child.group], grace=1.0)
        took = time.monotonic() - t
        assert [p.pid for p in all_procs if not gone(p)] == []
        assert took >= 1.0  # the grace was given before SIGKILL
        assert child.group.members() == [] and not child.group.alive()
    finally:
        kill(all_procs)


@pytest.mark.timeout(120)
def test_stop_does_not_wait_the_grace_for_a_child_that_obeys(tmp_path, started):
    child = supervisor.start([PY, "-c", "import time; time.sleep(300)"], tmp_path / "polite.log")
    started.append(child)
    t = time.monotonic()
    supervisor.stop([child.group], grace=ceiling(60))
    assert time.monotonic() - t < ceiling(10)
    assert child.popen.poll() is not None


# ------------------------------------------------------------------ the guard
PARENT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from flows.infra import supervisor
    out, mode, child_code = sys.argv[1], sys.argv[2], sys.argv[3]
    child = supervisor.start([sys.executable, "-c", child_code], out + ".log",
                             guard=mode != "poll")
    if mode == "poll":  # the same guard, on a Python without os.pidfd_open
        shim = ("import os, runpy, sys; del os.pidfd_open; path = sys.argv[1]; "
                "sys.argv = sys.argv[1:]; runpy.run_path(path, run_name='__main__')")
        child.guard = subprocess.Popen([sys.executable, "-I", "-c", shim, supervisor.__file__,
                                        "guard", str(os.getpid()), str(child.popen.pid),
                                        repr(child.group.create_time), "10"],
                                       start_new_session=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"child": child.popen.pid, "guard": child.guard.pid}, f)
    os.replace(out + ".tmp", out)
    time.sleep(300)
""")
SLEEPER = "import time; time.sleep(300)"


def start_parent(tmp_path: Path, mode: str, child_code: str = SLEEPER):
    out = tmp_path / "pids.json"
    parent = subprocess.Popen([PY, "-c", PARENT, str(out), mode, child_code], cwd=ROOT)
    return parent, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pidfd", "early", "poll"])
def test_a_child_is_gone_soon_after_its_parent_is_sigkilled(tmp_path, mode):
    """pidfd: the guard waits in select() when the parent dies; early: the parent dies before
    the guard is up (it finds itself re-parented); poll: a Python without os.pidfd_open."""
    parent, out = start_parent(tmp_path, mode)
    procs = [psutil.Process(parent.pid)]
    try:
        assert wait_for(out.is_file, ceiling(30)), "the parent never started its child"
        pids = read_json(out)
        procs += handles([pids["child"], pids["guard"]])
        assert len(procs) == 3 and not any(gone(p) for p in procs)
        if mode == "pidfd":
            assert wait_for(lambda: pidfds(pids["guard"]) == 2, ceiling(20))
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=ceiling(10))
        assert wait_for(lambda: all(gone(p) for p in procs[1:]), ceiling(20)), \
            [psutil.Process(p.pid).cmdline() for p in procs[1:] if not gone(p)]
        assert "parent %d is gone" % parent.pid in (tmp_path / "pids.json.log").read_text() \
            or mode == "poll"  # the poll-mode guard writes to the parent's stderr instead
    finally:
        kill(procs)
        parent.wait(timeout=10)


@pytest.mark.timeout(120)
def test_the_guard_does_not_outlive_its_child(tmp_path):
    """A child that exits by itself (and is not reaped yet) takes its guard with it."""
    parent, out = start_parent(tmp_path, "pidfd", "import time; time.sleep(1)")
    procs = [psutil.Process(parent.pid)]
    try:
        assert wait_for(out.is_file, ceiling(30)), "the parent never started its child"
        pids = read_json(out)
        procs += handles([pids["child"], pids["guard"]])
        assert wait_for(lambda: gone(procs[1]), ceiling(20))
        assert wait_for(lambda: gone(procs[2]), ceiling(10)), "the guard outlived its child"
        assert parent.poll() is None  # and it did not act on the parent
    finally:
        kill(procs)
        parent.wait(timeout=10)


@pytest.mark.timeout(120)
def test_child_stop_stops_the_guard_too(tmp_path, started):
    child = supervisor.start([PY, "-c", SLEEPER], tmp_path / "g.log", guard=True)
    started.append(child)
    guard = psutil.Process(child.guard.pid)
    child.stop(grace=ceiling(10))
    assert child.popen.returncode is not None and child.guard.returncode is not None
    assert gone(guard)


TEMP_PARENT = textwrap.dedent("""
    import json, os, sys, time
    from flows.infra import tempserver
    server = tempserver.start(timeout_s=float(sys.argv[2]))
    with open(sys.argv[1] + ".tmp", "w") as f:
        guard = server.child.guard
        json.dump({"server": server.child.popen.pid, "guard": guard and guard.pid}, f)
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(300)
""")


@pytest.mark.timeout(400)
def test_the_temporary_server_dies_with_a_sigkilled_cli(tmp_path):
    """What PR_SET_PDEATHSIG did for flows/infra/tempserver.py, now done by its guard."""
    out = tmp_path / "server.json"
    env = {**os.environ, "PEFT_BENCH_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([PY, "-c", TEMP_PARENT, str(out), str(ceiling(120))], cwd=ROOT,
                              env=env)
    procs = [psutil.Process(parent.pid)]
    try:
        assert wait_for(lambda: out.is_file() or parent.poll() is not None, ceiling(240))
        assert out.is_file(), f"the temporary server did not start (rc {parent.returncode})"
        procs += handles([pid for pid in read_json(out).values() if pid])
        assert not any(gone(p) for p in procs)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=ceiling(10))
        assert wait_for(lambda: all(gone(p) for p in procs[1:]), ceiling(30))
        assert len(procs) == 3  # the server had a guard
    finally:
        kill(procs)
        parent.wait(timeout=10)
