"""tasks.training.machine_load under a cpuset: busy time is counted only on the CPUs the process
may run on (its affinity set), the same CPUs whose capacity is the denominator. The host, its
per-CPU times, the wall clock and our own CPU time are faked from hand-made tables, so every
expected share below is computed by hand."""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from tasks.training import machine_load
from tasks.training.machine_load import MachineLoad

FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest",
          "guest_nice")


def _times(**seconds: float) -> SimpleNamespace:
    return SimpleNamespace(**{f: seconds.get(f, 0.0) for f in FIELDS})


def _fake_host(monkeypatch, affinity: set[int], before: list[dict], after: list[dict],
               own: tuple[float, float], wall: tuple[float, float] = (100.0, 110.0),
               stat_ids: list[int] | None = None) -> None:
    """A host whose per-CPU times are `before` at the window's start and `after` at its end
    (list position = /proc/stat line; `stat_ids` the CPU ids of those lines, None: no
    /proc/stat), with `affinity` as our CPUs, `own` our CPU time and `wall` the clock."""
    snapshots = iter([[_times(**t) for t in before], [_times(**t) for t in after]])

    def cpu_times(percpu: bool = False):
        assert percpu, "the totals count CPUs outside the affinity set"
        return next(snapshots)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setattr(psutil, "cpu_times", cpu_times)
    monkeypatch.setattr(machine_load, "_stat_cpu_ids", lambda: stat_ids)
    own_times = iter(own)
    monkeypatch.setattr(machine_load, "_own_seconds", lambda proc: next(own_times))
    monkeypatch.setattr(machine_load, "time", SimpleNamespace(perf_counter=iter(wall).__next__))


def _measure() -> machine_load.LoadReading:
    with MachineLoad() as load:
        pass
    return load.reading


IDLE4 = [{"idle": 1000.0}] * 4


def test_load_on_cpus_outside_the_affinity_set_does_not_count(monkeypatch):
    # 4-CPU host, we may use CPUs 1 and 2; 10 s window. CPUs 0 and 3 run flat out (another
    # container's job), CPU 1 runs only us (3 s of user time, which is our own 3 s).
    after = [{"user": 10.0, "idle": 1000.0}, {"user": 3.0, "idle": 1007.0},
             {"idle": 1010.0}, {"system": 10.0, "idle": 1000.0}]
    _fake_host(monkeypatch, {1, 2}, IDLE4, after, own=(50.0, 53.0))
    r = _measure()
    # busy on {1, 2} = 3 + 0 = 3; minus own 3 = 0; share 0 / (10 s x 2 CPUs) = 0.
    # (All CPUs, the old count: (10 + 3 + 0 + 10 - 3) / 20 = 1.0, a clean run flagged.)
    assert (r.wall_s, r.cpus, r.other_cpu_s) == (10.0, 2, 0.0)
    assert r.other_share == 0.0 and not r.contaminated()


def test_load_on_cpus_inside_the_affinity_set_counts(monkeypatch):
    # Same host and set. CPU 0 and 3 busy outside (9 s, 10 s). Inside: CPU 1 user 4 + system 1
    # (busy 5), CPU 2 nice 1 + irq 0.5 + softirq 0.5 + steal 1 (busy 3) and iowait 2, which is
    # not busy time. We used 3 s.
    after = [{"user": 9.0, "idle": 1001.0},
             {"user": 4.0, "system": 1.0, "idle": 1005.0},
             {"nice": 1.0, "irq": 0.5, "softirq": 0.5, "steal": 1.0, "iowait": 2.0,
              "idle": 1005.0},
             {"user": 10.0, "idle": 1000.0}]
    _fake_host(monkeypatch, {1, 2}, IDLE4, after, own=(50.0, 53.0))
    r = _measure()
    # busy on {1, 2} = 5 + 3 = 8; minus own 3 = 5; share 5 / (10 s x 2 CPUs) = 0.25 > 0.2.
    assert (r.wall_s, r.cpus) == (10.0, 2)
    assert r.other_cpu_s == pytest.approx(5.0)
    assert r.other_share == pytest.approx(0.25) and r.contaminated()
    assert not r.contaminated(threshold=0.3)


def test_cpu_ids_come_from_proc_stat_when_a_cpu_is_offline(monkeypatch):
    # CPU 2 offline: /proc/stat lists cpu0, cpu1, cpu3, so psutil's third entry is CPU 3. We may
    # use CPU 3 only; it is busy 6 s of a 10 s window, 1 s of it ours; CPU 1 (not ours) busy 10 s.
    before = [{"idle": 1000.0}] * 3
    after = [{"idle": 1010.0}, {"user": 10.0, "idle": 1000.0}, {"user": 6.0, "idle": 1004.0}]
    _fake_host(monkeypatch, {3}, before, after, own=(0.0, 1.0), stat_ids=[0, 1, 3])
    r = _measure()
    # busy on {3} = 6; minus own 1 = 5; share 5 / (10 s x 1 CPU) = 0.5.
    assert (r.cpus, r.other_cpu_s, r.other_share) == (1, 5.0, 0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_real_proc_stat_ids_cover_our_affinity_set():
    ids = machine_load._stat_cpu_ids()
    assert ids is not None and len(ids) == len(psutil.cpu_times(percpu=True))
    assert set(os.sched_getaffinity(0)) <= set(ids)


def test_real_window_reads_our_affinity_set():
    with MachineLoad() as load:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            pass
    r = load.reading
    assert r.cpus == machine_load.cpu_count() and r.wall_s >= 0.2
    assert 0.0 <= r.other_share <= 1.0
