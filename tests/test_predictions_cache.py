"""The paired tests' predictions are read once per run, and never stale (issue #21's overhead).

A real MLflow store in a temp folder; the oracle is the CSV the test itself wrote."""
from __future__ import annotations

import time

import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.analysis import predictions
from tasks.analysis.aggregate import seed_run
from tasks.common import names


@pytest.fixture()
def client(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri)
    c.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    return c


def _log(client, run_id, tmp_path, preds):
    path = tmp_path / names.PREDICTIONS
    pd.DataFrame({"label": [0, 1, 1], "prediction": preds, "text": ["a", "b", "c"]}).to_csv(
        path, index=False)
    client.log_artifact(run_id, str(path))


def _finish(client, run_id):
    time.sleep(0.002)  # end times are in milliseconds: two ends must differ
    client.set_terminated(run_id, "FINISHED")
    return seed_run(client.get_run(run_id))


def test_a_resumed_run_is_read_again_and_a_finished_one_from_memory(client, tmp_path):
    exp = client.get_experiment_by_name("e").experiment_id
    run = client.create_run(exp).info.run_id
    _log(client, run, tmp_path, [0, 1, 0])
    first = _finish(client, run)
    got = predictions.correct(client, first.run_id, first.artifact_uri, first.end_time)
    assert got["prediction"].tolist() == [0, 1, 0]
    assert list(got.columns) == ["label", "prediction"]
    # Same run, same end: served from memory (the file is gone, the answer is not).
    (tmp_path / "artifacts").rename(tmp_path / "moved")
    again = predictions.correct(client, first.run_id, first.artifact_uri, first.end_time)
    assert again is got
    (tmp_path / "moved").rename(tmp_path / "artifacts")
    # The run is resumed and ends again with other predictions: a new end time, read anew.
    client.update_run(run, "RUNNING")
    _log(client, run, tmp_path, [1, 1, 1])
    second = _finish(client, run)
    assert second.end_time != first.end_time
    fresh = predictions.correct(client, second.run_id, second.artifact_uri, second.end_time)
    assert fresh["prediction"].tolist() == [1, 1, 1]


def test_a_run_without_predictions_gives_none_and_a_remote_uri_is_downloaded(client, tmp_path):
    exp = client.get_experiment_by_name("e").experiment_id
    bare = _finish(client, client.create_run(exp).info.run_id)
    assert predictions.correct(client, bare.run_id, bare.artifact_uri, bare.end_time) is None
    # No artifact URI known (an old record): the download path answers the same.
    run = client.create_run(exp).info.run_id
    _log(client, run, tmp_path, [1, 0, 1])
    done = _finish(client, run)
    assert predictions.correct(client, done.run_id, "", done.end_time)[
        "prediction"].tolist() == [1, 0, 1]
