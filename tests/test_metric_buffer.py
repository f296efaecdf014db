"""Per-step metrics reach the store while a run trains, not only when a batch of 1000 fills:
whoever watches a run (the MLflow UI, a test waiting for a run to be training) sees it live."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from tasks.common import names
from tasks.config.schema import TrackingConfig
from tasks.tracking import runs as tracking


def _run(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="buffer")
    c = MlflowClient(cfg.tracking_uri)
    run_id = c.create_run(c.create_experiment("buffer")).info.run_id
    return cfg, c, run_id


def _logged(c: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in c.get_metric_history(run_id, names.TRAIN_LOSS)]


def test_an_old_batch_is_written_before_it_is_full(tmp_path):
    cfg, c, run_id = _run(tmp_path)
    buf = tracking.MetricBuffer(run_id, cfg, max_items=1000, max_age_s=0.0)
    buf.add({names.TRAIN_LOSS: 0.5}, step=1)  # its oldest metric is already max_age_s old
    assert _logged(c, run_id) == [1] and buf.items == []


def test_a_young_batch_waits_for_more_or_for_the_flush(tmp_path):
    cfg, c, run_id = _run(tmp_path)
    buf = tracking.MetricBuffer(run_id, cfg, max_items=4, max_age_s=3600.0)
    buf.add({names.TRAIN_LOSS: 0.5, names.TRAIN_LR: 1e-3}, step=1)
    assert _logged(c, run_id) == []  # buffered: the loop did not wait on the store
    buf.add({names.TRAIN_LOSS: 0.4, names.TRAIN_LR: 1e-3}, step=2)  # full: written
    buf.add({names.TRAIN_LOSS: 0.3, names.TRAIN_LR: 1e-3}, step=3)
    assert _logged(c, run_id) == [1, 2]
    buf.flush()
    assert _logged(c, run_id) == [1, 2, 3]
