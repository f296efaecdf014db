"""peft-bench's saved view in the MLflow UI: the chart view of the aggregate runs (one bar per
method), with accuracy, the training-time ratio and the peak-memory ratio against the reference
method on the first screen, the absolute numbers and the accuracy difference right below.

MLflow's UI keeps a chart layout in the browser only, unless it is saved as a view: an
experiment tag that its runs page opens from the `viewStateShareKey` URL parameter. That format
is the UI's own, not an API, so it is written only for the MLflow version it was read from
(PINNED_MLFLOW); on another version the view is skipped, with one warning, and `ui_path` leaves
the key out of the link (a key the UI cannot find sends it to the GenAI overview).

The UI's runs page cannot overwrite a saved view (its "Override saved view" copies one into the
browser's own layout; "Save as new view" writes another tag), so the tag is ours: rewritten
whenever its state is not the one below, left alone when it is.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import time
import zlib
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.common import names
from tasks.common.secrets import redact

# The MLflow release whose UI bundle the format below was read from
# (mlflow/server/js/build/static/js/ of the wheel): the envelope {name, createdAt, updatedAt,
# state} in 3448.da9a79ba.chunk.js (module 53787); the state (search facets + UI state, less
# runsExpanded/runsPinned/runsHidden/runsVisibilityMap/autoRefreshEnabled), JSON, then
# "deflate;" + base64 of zlib's deflate, and the 20,000-character cap, in the "Save view" modal
# of 5439.b5816bbb.chunk.js; the reader, which also takes an uncompressed state and ignores the
# key when the URL carries a search facet (searchFilter, orderByKey, ...), in
# 3878.0467b2c4.chunk.js; chart cards and sections in main.c2f5f8d4.js. Checked against a view
# the real UI saved (tests/fixtures/mlflow_ui_view_3.17.2.json) and in Chromium
# (tests/test_browser.py). A new MLflow needs both checks again before this changes.
PINNED_MLFLOW = "3.17.2"
VIEW_NAME = "peft-bench: methods compared"
COMPRESSED = "deflate;"
MAX_ENVELOPE = 20_000  # the UI saves no larger view (ours is about 1,000: test_ui_view.py)
SECTION_ID = f"{names.UI_VIEW_ID}-section"
CARD_HEIGHT = 340

# The cards, three a row: the first row is what a 1280x800 screen shows. Ratios, not seconds
# and megabytes, first: they pair each seed with the reference's same seed, and they stay
# comparable when the chart holds the aggregates of several benchmarks (another model, another
# machine). The reference has no ratio bar: it is 1 by definition. The runs page titles a card
# with its metric's name (and elides it in a narrow card: the whole name on hover).
CARDS = (
    names.agg(names.ACCURACY, "mean"),
    names.paired(names.TIME_RATIO, "mean"),
    names.paired(names.MEMORY_RATIO, "mean"),
    names.paired(names.ACC_DIFF, "mean"),
    names.agg(names.TRAIN_TIME, "mean"),
    names.agg(names.PEAK_MEMORY, "mean"),
)

log = logging.getLogger(names.PROGRESS_LOGGER)  # a person should see why the link is plain
_warned: set[str] = set()


def tag_key() -> str:
    return names.SHARED_VIEW_PREFIX + names.UI_VIEW_ID


def installed_is_pinned() -> bool:
    return mlflow.__version__ == PINNED_MLFLOW


def _card(metric: str) -> dict:
    # The fields of the UI's own bar card, serialised; not "generated", so the UI never swaps
    # it for a card of its own (it turns a generated bar into a line for a metric with steps).
    return {"uuid": f"{names.UI_VIEW_ID}-{metric}", "type": "BAR", "runsCountToCompare": 10,
            "metricSectionId": SECTION_ID, "deleted": False, "isGenerated": False,
            "displayName": metric, "metricKey": metric}


def view_state() -> dict:
    """The state as the UI's "Save view" writes it, our values in place of its defaults."""
    return {
        "searchFilter": f"tags.{names.ROLE} = '{names.ROLE_AGGREGATE}'",
        "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"],
        "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": [_card(m) for m in CARDS],
        # Cards of the other metrics land in MLflow's own "Model metrics" section, after ours:
        # isAccordionReordered keeps the sections in our order (else the UI sorts sections of
        # "prefix/" metrics by name ahead of every other). isReordered: our cards' order is
        # deliberate. 340 px cards (the UI's default 360): the first row ends inside the charts'
        # pane of an 800-high screen, under the UI's "viewing a shared view" banner too.
        "compareRunSections": [{"uuid": SECTION_ID, "name": "Methods compared", "display": True,
                                "isReordered": True, "deleted": False, "isGenerated": False,
                                "cardHeight": CARD_HEIGHT}],
        "viewMaximized": False,
        # The run list hidden: beside it (and the assistant panel) a 1280-wide screen leaves
        # each card about 120 px and no readable title; the legends name the runs.
        "runListHidden": True, "isAccordionReordered": True,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                  "selectedXAxisMetricKey": ""},
    }


def _json(value) -> str:
    # JSON.stringify's spelling: no spaces, non-ASCII as is.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_state(state: dict) -> str:
    """As the UI compresses it (pako's deflate at its default level is zlib's)."""
    return COMPRESSED + base64.b64encode(zlib.compress(_json(state).encode())).decode()


def decode_state(text: str) -> dict:
    if text.startswith(COMPRESSED):
        text = zlib.decompress(base64.b64decode(text[len(COMPRESSED):])).decode()
    return json.loads(text)


def envelope(state: dict, created_ms: int, updated_ms: int) -> str:
    return _json({"name": VIEW_NAME, "createdAt": created_ms, "updatedAt": updated_ms,
                  "state": encode_state(state)})


def read_envelope(value: Optional[str]) -> Optional[dict]:
    """The stored envelope with its state decoded; None for none, or one the UI cannot read."""
    try:
        env = json.loads(value) if value else None
        if not isinstance(env, dict) or not isinstance(env.get("state"), str):
            return None
        return {**env, "state": decode_state(env["state"])}
    except (ValueError, zlib.error):
        return None


@functools.lru_cache(maxsize=8)
def _server_version(tracking_uri: str) -> str:
    import httpx

    try:  # `mlflow server` answers its version at /version
        r = httpx.get(tracking_uri.rstrip("/") + "/version", timeout=5)
        return r.text.strip() if r.status_code == 200 else f"unknown (HTTP {r.status_code})"
    except httpx.HTTPError as e:
        return f"unknown ({type(e).__name__})"


def unsupported(tracking_uri: str) -> Optional[str]:
    """Why the view must not be written for this store, or None. The UI that reads it is the
    installed one (`mlflow ui`) for a local store, the server's for an http one."""
    pinned = f"its format is pinned to MLflow {PINNED_MLFLOW}'s UI"
    if not installed_is_pinned():
        return f"{pinned}, and this is MLflow {mlflow.__version__}"
    if tracking_uri.startswith(("http://", "https://")):
        version = _server_version(tracking_uri)
        if version != PINNED_MLFLOW:
            return f"{pinned}, and the tracking server runs MLflow {version}"
    return None


def _warn_once(why: str) -> None:
    if why not in _warned:  # once a process: experiment_id() runs for every run it opens
        _warned.add(why)
        log.warning(redact(f"MLflow UI: peft-bench's saved chart view not written ({why}); "
                           "the UI opens with its own chart layout"))


def ensure(client: MlflowClient, experiment_id: str, tags: dict[str, str],
           tracking_uri: str) -> str:
    """Write our view unless the experiment holds it already (`tags`: the experiment's).
    Returns "current", "skipped" (not pinned, or the store refused) or "written". Never raises
    for the view: a benchmark does not fail for a UI layout."""
    state = view_state()
    stored = read_envelope(tags.get(tag_key()))
    if stored is not None and stored["state"] == state:
        return "current"
    if why := unsupported(tracking_uri):
        _warn_once(why)
        return "skipped"
    now = int(time.time() * 1000)
    created = stored.get("createdAt") if stored else None  # the view's age survives an update
    value = envelope(state, created if isinstance(created, int) else now, now)
    try:
        client.set_experiment_tag(experiment_id, tag_key(), value)
    except MlflowException as e:
        _warn_once(f"the store refused it: {type(e).__name__}: {e}")
        return "skipped"
    return "written"
