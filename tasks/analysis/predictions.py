"""A finished run's per-row predictions (`names.PREDICTIONS`), read once per process.

The paired tests (McNemar) need every run's label and prediction per row. One benchmark reads
them three times (the aggregates, Prefect's results table, the report) and the reference
method's once per other method: 18 reads for four methods under one seed. Each read through
`MlflowClient.download_artifacts` also resolves a `runs:/` URI, which MLflow 3 first tries as
a logged model (measured: about half of each read; benchmarks/pipeline_overhead.py, issue #21).
So the file is read from the run's own artifact URI, straight from disk when that is a local
folder, and kept keyed by the run and its end time: a resumed run ends again with a new end
time, so its new predictions are never hidden behind the old ones.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from tasks.common import names

_KEEP = 256  # runs; a few hundred kB each at SST-2's 872 rows
_cache: OrderedDict[tuple[str, int, str], pd.DataFrame] = OrderedDict()


def _read(client: MlflowClient, run_id: str, artifact_uri: str) -> pd.DataFrame:
    # MLflow draws a progress bar per download; one per run and seed drowns the console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cols = ["label", "prediction"]
    if artifact_uri:
        repo = get_artifact_repository(artifact_uri)
        if isinstance(repo, LocalArtifactRepository):
            return pd.read_csv(Path(repo.artifact_dir) / names.PREDICTIONS, usecols=cols)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, names.PREDICTIONS, tmp)
        return pd.read_csv(path, usecols=cols)


def correct(client: MlflowClient, run_id: str, artifact_uri: str = "",
            end_time: int = 0) -> Optional[pd.DataFrame]:
    """The run's `label` and `prediction` columns, or None when it has none (an old run, or
    weights logging off). Only finished runs are read (the caller's SeedRun.finished)."""
    key = (run_id, end_time, artifact_uri)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    try:
        frame = _read(client, run_id, artifact_uri)
    except Exception:  # noqa: BLE001 - no predictions: the caller notes it, no McNemar test
        return None
    _cache[key] = frame
    while len(_cache) > _KEEP:
        _cache.popitem(last=False)
    return frame
