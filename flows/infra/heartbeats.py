"""Prefect's flow-run heartbeats without the wait at every flow's end.

Prefect 3.9 (PrefectHQ/prefect#19641) sends heartbeats from a daemon thread that sleeps in
one-second steps and, when the flow ends, joins it (up to 2 s). The join waits out the rest of
the thread's current second: 0–1 s at the end of every flow run that sends heartbeats. In a
`dispatch: local` benchmark that is the parent (its in-process children send none,
flows/benchmark.py); with `dispatch: deployments`, every method's flow run as well. Measured
on this 2-core machine: four empty subflows with heartbeats took 4.6 s with the join, 0.7 s
without it (issue #21's overhead). The thread needs no join: it checks for the
flow's final state before each heartbeat and for the stop event every second, so it sends
nothing after the run ends and exits by itself within a second; it is a daemon, so it never
keeps the process alive. Heartbeats themselves are unchanged (zombie detection,
deploy/crash-zombie-flow-runs.yaml, still sees them).

`install()` passes `join_on_exit=False` (Prefect's own switch, used by its async engine) to
the sync engine's calls. If a later Prefect renames the function or the switch, it leaves
Prefect as it is and says so once; tests/test_heartbeats.py then fails, so the change is seen.
"""
from __future__ import annotations

import functools
import inspect
import logging

log = logging.getLogger(__name__)
_MARK = "_peft_bench_no_join"


def install() -> bool:
    """Idempotent; True when Prefect's sync flow engine no longer joins its heartbeat thread."""
    import prefect.flow_engine as engine

    original = getattr(engine, "_send_heartbeats", None)
    if original is None:
        log.warning("prefect.flow_engine._send_heartbeats is gone: heartbeats left as they are")
        return False
    if getattr(original, _MARK, False):
        return True
    if "join_on_exit" not in inspect.signature(original).parameters:
        log.warning("Prefect's _send_heartbeats has no join_on_exit: heartbeats left as they are")
        return False

    engine._send_heartbeats = without_join(original)
    return True


def without_join(original):
    """`original` (Prefect's context manager factory) always called with join_on_exit=False."""
    @functools.wraps(original)
    def no_join(engine_, join_on_exit: bool = True):
        return original(engine_, join_on_exit=False)

    setattr(no_join, _MARK, True)
    return no_join
