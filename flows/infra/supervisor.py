"""One way to start, wait for and stop the processes of `flows.infra` (the stack, the temporary
Prefect server), so that a fix to process handling is made once.

- `start`: the child gets a session of its own (`start_new_session`), so its pid is also its
  process-group id and `stop` reaches the processes it starts; no `preexec_fn`, which runs
  Python between fork and exec and is unsafe in a parent that has threads. Output goes to a log.
- `wait_ready`: poll a readiness check until a deadline; a child that exits first fails at
  once, with the end of its log, instead of making the caller wait the whole deadline.
- `stop`: SIGTERM every member of each group (servers get to close their databases), SIGKILL
  whatever is left after a grace period: nothing outlives the call, not even a child that
  ignores SIGTERM, nor a grandchild.
- the guard: `start(..., guard=True)` also starts `python supervisor.py guard PARENT CHILD ...`,
  a small process in a session of its own that waits for the parent (pidfd_open + select;
  polling where pidfd is missing) and stops the child's group when the parent dies, however it
  dies, SIGKILL included. It replaces PR_SET_PDEATHSIG, which needed ctypes, a hard-coded libc
  and a preexec_fn, and which fires when the forking *thread* exits, not the process. The guard
  exits by itself once the child is gone, and `Child.stop` stops it.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import psutil

GUARD_GRACE_S = 10.0
KILL_WAIT_S = 5.0


class NotReady(RuntimeError):
    """The child exited (`exited`), or the deadline passed, before it was ready. The message
    names the child's log and quotes its end: the one thing a user needs to see why."""

    def __init__(self, message: str, exited: bool):
        super().__init__(message)
        self.exited = exited


@dataclass(frozen=True)
class Group:
    """A child's process group: the leader's pid (its group id, the leader having a session of
    its own) and its start time, which tells it from a later process that reuses the pid."""

    pid: int
    create_time: float

    def _belongs(self, p: psutil.Process) -> bool:
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            return False
        born = p.info["create_time"]
        if p.pid == self.pid:  # the leader, even one that never got a group of its own
            return abs(born - self.create_time) < 1
        return born >= self.create_time - 1 and os.getpgid(p.pid) == self.pid

    def members(self) -> list[psutil.Process]:
        """Live processes of the group, plus the leader's descendants that left it (a
        grandchild in a session of its own would otherwise outlive `stop`)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["create_time", "status"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if self._belongs(p):
                    found[p.pid] = p
        if self.pid in found:
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in found[self.pid].children(recursive=True)})
        return list(found.values())

    def alive(self) -> bool:
        return bool(self.members())

    def leader_alive(self) -> bool:
        """The leader alone: what the guard's poll fallback checks, without a process scan."""
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.pid)
            return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - self.create_time) < 1
        return False


@dataclass
class Child:
    """What `start` started: the child, its group, its log and, if asked for, its guard."""

    popen: subprocess.Popen
    group: Group
    log: Path
    guard: Optional[subprocess.Popen] = None

    def stop(self, grace: float = 10.0) -> None:
        """Stop the child's group, then its guard (which has nothing left to guard)."""
        stop([self.group], grace)
        self.popen.poll()  # reaped by `stop` or now: no zombie, no ResourceWarning
        if self.guard is not None:
            self.guard.terminate()
            self.guard.wait()


def log_tail(path: str | Path, lines: int = 20) -> str:
    p = Path(path)
    return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.is_file() else ""


def start(argv: list[str], log: str | Path, env: Optional[dict[str, str]] = None,
          cwd: Optional[str | Path] = None, guard: bool = False) -> Child:
    """Start `argv` in a session of its own, output appended to `log`. With `guard`, the child
    is stopped when this process dies (see the module docstring): for a child that must never
    outlive its parent, unlike the stack's servers, which outlive `stack up` on purpose."""
    log = Path(log)
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                 start_new_session=True)
        child = Child(popen, Group(popen.pid, psutil.Process(popen.pid).create_time()), log)
        if guard:
            argv = [sys.executable, "-I", str(Path(__file__).resolve()), "guard",
                    str(os.getpid()), str(popen.pid), repr(child.group.create_time),
                    str(GUARD_GRACE_S)]
            child.guard = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
    return child


def wait_ready(ready: Callable[[], bool], alive: Callable[[], bool], *, name: str,
               log: str | Path, timeout: float, what: str = "healthy", interval: float = 0.5,
               ignore: tuple[type[BaseException], ...] = (OSError,)) -> float:
    """Poll `ready()` (its `ignore` errors count as not ready) until true and return the
    seconds it took; raise NotReady at once when `alive()` turns false, or at the deadline."""
    begin = time.monotonic()
    deadline = begin + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(*ignore):
            if ready():
                return time.monotonic() - begin
        if not alive():
            raise NotReady(f"{name} exited before {what}; see {log}:\n{log_tail(log)}", True)
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    raise NotReady(f"{name} not {what} after {timeout:.0f}s; see {log}:\n{log_tail(log)}", False)


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _wait_gone(groups: list[Group], timeout: float) -> list[psutil.Process]:
    """Wait until no group has a live member; return those left at the deadline. wait_procs
    reaps the members that are our children; members() skips zombies that are not ours."""
    deadline = time.monotonic() + timeout
    while (left := [p for g in groups for p in g.members()]) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=max(0.0, min(0.2, deadline - time.monotonic())))
    return left


def stop(groups: Iterable[Group], grace: float = 10.0) -> None:
    """SIGTERM every member of every group at once, SIGKILL whatever is left after `grace`
    seconds, and wait for it: the groups are stopped in parallel, not one grace after another."""
    groups = list(groups)
    _signal([p for g in groups for p in g.members()], signal.SIGTERM)
    left = _wait_gone(groups, grace)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(groups, KILL_WAIT_S)
    for g in groups:
        with contextlib.suppress(ChildProcessError):  # reap a leader we started
            os.waitpid(g.pid, os.WNOHANG)


def _parent_died_first(parent_pid: int, child: Group) -> bool:
    """Block until the parent or the child exits; True if it was the parent. A changed
    getppid() means the parent is gone already (this process was re-parented), pid reuse or not."""
    try:
        fds = [os.pidfd_open(parent_pid), os.pidfd_open(child.pid)]
    except (AttributeError, OSError):  # no pidfd (Python, kernel or OS): poll instead
        while os.getppid() == parent_pid:
            if not child.leader_alive():
                return False
            time.sleep(0.5)
        return True
    try:
        if os.getppid() != parent_pid:  # it died before its pidfd was opened
            return True
        ready, _, _ = select.select(fds, [], [])
        return fds[0] in ready
    finally:
        for fd in fds:
            os.close(fd)


def guard(parent_pid: int, child: Group, grace: float = GUARD_GRACE_S) -> None:
    """The guard process: stop the child's group if the parent dies before the child."""
    if _parent_died_first(parent_pid, child):
        print(f"supervisor guard: parent {parent_pid} is gone; stopping group {child.pid}",
              file=sys.stderr, flush=True)
        stop([child], grace)


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    guard(int(sys.argv[2]), Group(int(sys.argv[3]), float(sys.argv[4])), float(sys.argv[5]))
