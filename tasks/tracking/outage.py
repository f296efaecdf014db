"""When the MLflow server goes away mid-run: ride out a short outage, fail clearly on a long one.

MLflow's HTTP client retries each request with exponential backoff. Its defaults (7 retries,
factor 2, 120 s timeout) make one call wait minutes on a dead server, and a failing benchmark
makes dozens of calls on its way out. peft-bench bounds them (unless the environment says
otherwise): 5 retries at factor 2 wait 2 + 4 + 8 + 16 + 32 s, so any single call, the training
loop's buffered metrics included, survives an outage of about a minute and then goes through.

A longer outage raises `StoreUnreachable` (a ConnectionError: the CLI's exit 4). From then on
the error path asks the server's /health once (3 s) before each call it would make to close a
run, and skips the call when the server is still away, so the exit comes in bounded time. The
runs it could not close stay RUNNING with a dead owner: the next `peft-bench run` or
`peft-bench close-stale` closes them as FAILED once the server is back (tasks/tracking/lifecycle.py).
"""
from __future__ import annotations

import os

from tasks.common.secrets import redact
from tasks.config.schema import TrackingConfig

RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _key, _value in RETRY_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


class StoreUnreachable(ConnectionError):
    """The MLflow server stopped answering during a run, for longer than its retries last."""


def is_remote(tracking: TrackingConfig) -> bool:
    return tracking.tracking_uri.startswith(("http://", "https://"))


def reachable_now(tracking: TrackingConfig, timeout_s: float = 3.0) -> bool:
    """One quick GET /health (local stores are always reachable)."""
    if not is_remote(tracking):
        return True
    import httpx

    try:
        return httpx.get(tracking.tracking_uri.rstrip("/") + "/health",
                         timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def lost(tracking: TrackingConfig, error: BaseException) -> StoreUnreachable | None:
    """A StoreUnreachable for `error` if the server is (still) away, else None."""
    if isinstance(error, StoreUnreachable):
        return error
    if not is_remote(tracking) or reachable_now(tracking):
        return None
    from tasks.common.errors import describe

    return StoreUnreachable(redact(
        f"tracking.tracking_uri: the MLflow server {tracking.tracking_uri} stopped answering "
        f"during the run ({describe(error, one_line=True, limit=300)}); the runs left open are "
        "closed by the next `peft-bench run` or `peft-bench close-stale` once it is back"))


def caused_by_outage(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it was raised from, is a StoreUnreachable."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, StoreUnreachable):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False
