"""peft-bench's saved MLflow UI view (tasks/tracking/ui_view.py): its format against views the
real MLflow 3.17.2 UI wrote (tests/fixtures/mlflow_ui_view_3.17.2.json, captured by
tests/fixtures/capture_mlflow_ui_view.py), and the experiment tag it leaves in a real sqlite
store, read back through MLflow's own client. That the UI shows it as meant: test_browser.py."""
from __future__ import annotations

import base64
import json
import logging
import socket
import zlib
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.common import names
from tasks.config.schema import TrackingConfig
from tasks.tracking import runs, ui_view

FIXTURE = json.loads((Path(__file__).parent / "fixtures"
                      / f"mlflow_ui_view_{ui_view.PINNED_MLFLOW}.json").read_text())
RECAPTURE = "run tests/fixtures/capture_mlflow_ui_view.py again and commit its JSON"


def _state(capture: str) -> dict:
    """A captured tag's state, unpacked here by hand: JSON, "deflate;" + base64 of zlib."""
    text = json.loads(FIXTURE[capture]["value"])["state"]
    assert text.startswith("deflate;")
    return json.loads(zlib.decompress(base64.b64decode(text[len("deflate;"):])))


def test_the_fixture_is_of_the_pinned_and_installed_mlflow():
    assert FIXTURE["mlflow"] == ui_view.PINNED_MLFLOW == mlflow.__version__


def test_a_state_encodes_exactly_as_the_ui_encodes_it():
    ui_text = json.loads(FIXTURE["ui_default"]["value"])["state"]
    assert ui_view.encode_state(_state("ui_default")) == ui_text  # byte for byte
    assert ui_view.decode_state(ui_text) == _state("ui_default")
    env = json.loads(FIXTURE["ui_default"]["value"])
    assert list(json.loads(ui_view.envelope({}, 1, 2))) == list(env)  # the UI's fields, in order


def test_our_view_has_the_fields_the_ui_writes():
    ui, ours = _state("ui_default"), ui_view.view_state()
    assert set(ours) == set(ui)
    ui_bar = next(c for c in ui["compareRunCharts"] if c["type"] == "BAR")
    for card in ours["compareRunCharts"]:
        assert set(card) == set(ui_bar), card
    # cardHeight: the one section field the UI's default layout leaves out; the UI keeps it
    # (next test) and writes it when a person resizes a section's cards.
    assert set(ours["compareRunSections"][0]) == set(ui["compareRunSections"][0]) | {"cardHeight"}


def test_the_ui_read_every_field_of_our_view():
    assert _state("ours_written") == ui_view.view_state(), f"our view changed: {RECAPTURE}"
    read, ours = _state("ours_saved_by_the_ui"), ui_view.view_state()
    for key in set(ours) - {"compareRunCharts", "compareRunSections"}:
        assert read[key] == ours[key], key
    kept = [c for c in read["compareRunCharts"] if c["metricSectionId"] == ui_view.SECTION_ID]
    assert kept == ours["compareRunCharts"]  # our cards, in our order, untouched
    assert read["compareRunSections"][0] == ours["compareRunSections"][0]  # our section first
    assert [c["metricKey"] for c in kept[:3]] == ["accuracy_mean", "time_ratio_vs_ref_mean",
                                                  "memory_ratio_vs_ref_mean"]
    assert read["searchFilter"] == "tags.peft_bench.role = 'aggregate'"


def test_our_view_fits_under_the_ui_s_cap():
    assert len(ui_view.envelope(ui_view.view_state(), 1, 1)) < ui_view.MAX_ENVELOPE


def _tracking(tmp_path, name: str = "views") -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment=name)


def _tag(tracking: TrackingConfig, eid: str):
    return MlflowClient(tracking.tracking_uri).get_experiment(eid).tags.get(
        "mlflow.sharedViewState.peft-bench-methods")


def test_setting_up_the_experiment_writes_the_view_once(tmp_path):
    tracking = _tracking(tmp_path)
    eid = runs.experiment_id(tracking)
    first = _tag(tracking, eid)
    assert first is not None and json.loads(first)["name"] == ui_view.VIEW_NAME
    assert ui_view.read_envelope(first)["state"] == ui_view.view_state()
    assert runs.experiment_id(tracking) == eid
    assert _tag(tracking, eid) == first  # not rewritten: updatedAt unchanged
    assert runs.ui_path(eid).endswith("&viewStateShareKey=peft-bench-methods")
    assert runs.ui_path(eid, tracking.tracking_uri) == runs.ui_path(eid)


def test_an_older_view_of_ours_is_replaced_and_keeps_its_age(tmp_path):
    tracking = _tracking(tmp_path)
    eid = runs.experiment_id(tracking)
    old = {**ui_view.view_state(), "compareRunCharts": ui_view.view_state()["compareRunCharts"][:1]}
    c = MlflowClient(tracking.tracking_uri)
    c.set_experiment_tag(eid, ui_view.tag_key(), ui_view.envelope(old, 1000, 1000))
    runs.experiment_id(tracking)
    env = json.loads(_tag(tracking, eid))
    assert env["createdAt"] == 1000 and env["updatedAt"] > 1000
    assert ui_view.read_envelope(_tag(tracking, eid))["state"] == ui_view.view_state()


def test_an_experiment_of_an_earlier_peft_bench_gets_the_view(tmp_path):
    tracking = _tracking(tmp_path)
    c = MlflowClient(tracking.tracking_uri)
    eid = c.create_experiment(tracking.experiment)  # no tags at all: before this change
    assert runs.ui_path(eid, tracking.tracking_uri).find("viewStateShareKey") == -1
    assert runs.experiment_id(tracking) == eid
    assert _tag(tracking, eid) is not None
    assert "viewStateShareKey=peft-bench-methods" in runs.ui_path(eid, tracking.tracking_uri)


def test_another_mlflow_gets_no_view_and_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ui_view, "PINNED_MLFLOW", "3.16.0")  # as if another MLflow were installed
    monkeypatch.setattr(ui_view, "_warned", set())
    tracking = _tracking(tmp_path)
    with caplog.at_level(logging.WARNING, logger=names.PROGRESS_LOGGER):
        eid = runs.experiment_id(tracking)
        runs.experiment_id(tracking)
    assert _tag(tracking, eid) is None
    warned = [r.getMessage() for r in caplog.records if "saved chart view" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "3.16.0" in warned[0] and mlflow.__version__ in warned[0]
    assert "viewStateShareKey" not in runs.ui_path(eid)  # else the UI opens its GenAI overview


def test_a_server_that_does_not_answer_its_version_gets_no_view():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    why = ui_view.unsupported(f"http://127.0.0.1:{port}")
    assert why is not None and "tracking server runs MLflow unknown" in why


def test_a_store_that_refuses_the_tag_does_not_fail_the_caller(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ui_view, "_warned", set())
    tracking = _tracking(tmp_path)
    c = MlflowClient(tracking.tracking_uri)
    eid = c.create_experiment("gone")
    c.delete_experiment(eid)  # MLflow refuses tags on a deleted experiment
    with caplog.at_level(logging.WARNING, logger=names.PROGRESS_LOGGER):
        assert ui_view.ensure(c, eid, {}, tracking.tracking_uri) == "skipped"
    assert any("store refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["", "not json", '{"name": "x"}',
                                   '{"name": "x", "createdAt": 1, "state": "deflate;!!"}'])
def test_an_unreadable_tag_is_replaced(tmp_path, value):
    tracking = _tracking(tmp_path)
    eid = runs.experiment_id(tracking)
    c = MlflowClient(tracking.tracking_uri)
    if value:
        c.set_experiment_tag(eid, ui_view.tag_key(), value)
    else:
        c.delete_experiment_tag(eid, ui_view.tag_key())
    runs.experiment_id(tracking)
    assert ui_view.read_envelope(_tag(tracking, eid))["state"] == ui_view.view_state()
