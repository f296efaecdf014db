"""Prefect's heartbeats go on, without the wait at each flow's end (flows/infra/heartbeats.py)."""
from __future__ import annotations

import time

import prefect.flow_engine
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.runtime import flow_run

import flows  # noqa: F401 - installs the shim, as every entry point does
from flows.infra import heartbeats
from tests.conftest import ceiling

HEARTBEAT = "prefect.flow-run.heartbeat"


def test_the_shim_is_installed_on_this_prefect():
    """Fails when a Prefect upgrade renames what the shim wraps (install() then warns)."""
    assert getattr(prefect.flow_engine._send_heartbeats, heartbeats._MARK, False)
    assert heartbeats.install() is True  # idempotent: not wrapped twice
    assert not getattr(prefect.flow_engine._send_heartbeats.__wrapped__, heartbeats._MARK, False)


def test_the_engine_asks_for_no_join():
    calls = []
    wrapped = heartbeats.without_join(lambda engine, join_on_exit=True: calls.append(join_on_exit))
    wrapped("engine")
    wrapped("engine", join_on_exit=True)
    assert calls == [False, False]


def _heartbeats_of(run_id: str) -> int:
    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(
            event=EventNameFilter(name=[HEARTBEAT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"])), limit=5)
    return len(page.events)


@flow
def _child() -> str:
    # The thread sends its first heartbeat as the run starts: wait for the server to have it,
    # so the run cannot end (and its thread stop) before one was sent.
    me, deadline = flow_run.get_id(), time.monotonic() + ceiling(60)
    while not _heartbeats_of(me):
        assert time.monotonic() < deadline, "no heartbeat reached the server"
        time.sleep(0.2)
    return me


@flow
def _parent() -> tuple[str, str]:
    return flow_run.get_id(), _child()


def test_parent_and_subflow_still_send_heartbeats(prefect_harness):
    parent, child = _parent()
    assert _heartbeats_of(child) >= 1
    deadline = time.monotonic() + ceiling(60)  # the parent's goes through the events worker
    while not _heartbeats_of(parent):
        assert time.monotonic() < deadline, "the parent's heartbeat never reached the server"
        time.sleep(0.2)
