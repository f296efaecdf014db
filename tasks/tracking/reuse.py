"""Run-level reuse: a run whose settings, data and code were already trained to FINISHED in the
same experiment is copied instead of trained again, so a re-run of a sweep costs only the grid
points that changed, failed or never ran.

The run key hashes everything that decides a run's numbers: the model, the data config and
the digest of the rows, the method with its grid point applied, the training config with its
seed, the split it is scored on, the source of the code that computes or records them
(`REUSE_CODE`), the versions of the libraries and the device. A copy is a new child run of the
new benchmark with the original's params, tags, every metric history and its predictions,
config and confusion matrix, tagged `peft_bench.reused_from` (its adapter stays in the
original run).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from tasks.common import names
from tasks.config.schema import BenchConfig
from tasks.tracking import runs, store

# The source `code_version` hashes: what changes the numbers a run computes or what a copy of it
# carries. An edit anywhere else leaves every finished run reusable.
REUSE_CODE = (
    "peft_modules",        # the adapters themselves: layers, injection, quantisation, formats
    "tasks/prepare.py",    # which rows, cleaned and tokenised how
    "tasks/data",          # reading, labels, collation and batching
    "tasks/load.py",       # the base model, its dtype/quantisation, the adapter injected into it
    "tasks/models",        # where model files come from and how they are pinned
    "tasks/train.py",      # the training loop
    "tasks/training",      # checkpoints, peak memory and the machine-load share a run records
    "tasks/evaluate.py",   # the scores, the predictions and the confusion matrix
    "tasks/common/names.py",  # metric, param and tag names: the names a copy carries
    "flows/finetune.py",   # one run end to end: what it trains, scores and logs
)
# Out: flows/cli/ (commands, help text, display), flows/orchestration/ and flows/benchmark.py
# (which runs are dispatched where; each run's own numbers come from finetune), flows/infra/
# (servers), tasks/reporting/, tasks/report.py, tasks/analysis/ and tasks/conclude.py (read
# finished runs and summarise them, so a copy is reported by whatever code reads it),
# tasks/tracking/ (MLflow plumbing), tasks/config/ (the settings are in the key as values) and
# the rest of tasks/common/ (errors, progress, secrets).
REUSE_SUFFIXES = (".py",)
COPIED_ARTIFACTS = (names.PREDICTIONS, names.CONFIG_FILE, names.CONFUSION_MATRIX)
_NOT_COPIED_TAGS = (names.PARENT, names.OWNER, names.FLOW_RUN_ID, names.FLOW_RUN_NAME,
                    names.FLOW_RUN_URL, names.WORKER, names.RESUMED)


@lru_cache(maxsize=8)
def code_version(root: Optional[Path] = None) -> str:
    """A hash of the `REUSE_CODE` source under `root` (this checkout when None), uncommitted edits
    included."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    h = hashlib.sha256()
    for entry in REUSE_CODE:
        top = root / entry
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        h.update(entry.encode() + (b"" if top.exists() else b" missing"))
        for path in files:
            if path.is_file() and path.suffix in REUSE_SUFFIXES:
                h.update(path.relative_to(root).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_key(cfg: BenchConfig, method_name: str, split: str, data_digest: str,
            device: str) -> str:
    method = next(m for m in cfg.methods if m.name == method_name)
    training = cfg.training.model_dump(mode="json", exclude={
        "seeds", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "keep_last"})
    body = {"model": cfg.model.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
            "digest": data_digest, "method": method.model_dump(mode="json", exclude={"sweep"}),
            "training": training, "split": split, "code": code_version(),
            "versions": runs.versions(), "device": device}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def find_reusable(client: MlflowClient, experiment_id: str, key: str) -> Optional[Run]:
    runs = store.by_run_key(client, experiment_id, key)
    originals = [r for r in runs if names.REUSED_FROM not in r.data.tags]
    return (originals or runs or [None])[0]


def copy_run(client: MlflowClient, src: Run, parent_run_id: str, owner: str) -> str:
    """A FINISHED copy of `src` under `parent_run_id`."""
    origin = src.data.tags.get(names.REUSED_FROM, src.info.run_id)
    tags = {k: v for k, v in src.data.tags.items()
            if not k.startswith("mlflow.") and k not in _NOT_COPIED_TAGS}
    tags.update({names.PARENT: parent_run_id, names.REUSED_FROM: origin})
    rid = runs.new_run(client, src.info.experiment_id, src.info.run_name, tags, owner=owner)
    params = [Param(k, v) for k, v in src.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100])
    metrics: list[Metric] = []
    for key in src.data.metrics:
        metrics += client.get_metric_history(src.info.run_id, key)
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        present = {a.path for a in client.list_artifacts(src.info.run_id)}
        for name in COPIED_ARTIFACTS:
            if name in present:
                client.log_artifact(rid, client.download_artifacts(src.info.run_id, name, tmp))
    client.log_batch(rid, tags=[RunTag(names.OWNER, owner)])
    client.set_terminated(rid, "FINISHED")
    return rid
