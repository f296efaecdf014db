"""MLflow bookkeeping with explicit run ids.

Everything goes through MlflowClient and a run id, never through mlflow's thread-local "active
run": Prefect runs tasks in worker threads (and, with deployments, in other processes), where
the active run is not visible. Every run this module opens is closed FINISHED or FAILED.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from tasks.common import names
from tasks.common.errors import describe
from tasks.common.secrets import redact
from tasks.config.build import public_dump
from tasks.config.schema import BenchConfig, TrackingConfig
from tasks.models.source import pinned_digest
from tasks.tracking import outage, store, ui_view
from tasks.tracking.owner import owner_tag

# MLflow writes "View run ... at: <tracking URI>/#/..." to stdout when a run against a server
# ends: one line per run, and the URI may carry credentials. The CLI prints the UI command once.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PACKAGES = ("torch", "transformers", "peft-bench", "bitsandbytes", "prefect", "mlflow",
            "tokenizers", "datasets")
MAX_PARAM = 6000  # MLflow's limit on a param value


def client(tracking: TrackingConfig) -> MlflowClient:
    return client_at(tracking.tracking_uri)


def client_at(tracking_uri: str) -> MlflowClient:
    """The one place a client is made: every read and write of the store starts here."""
    return MlflowClient(tracking_uri=tracking_uri)


def new_run(c: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
            owner: Optional[str] = None) -> str:
    """Every run peft-bench creates is created here (benchmark parents, (method, seed) children,
    per-method aggregates, a sweep's method runs, reused copies), with the tags every run must
    carry: its role (what reads it tells runs apart by role) and its owner (`peft_bench.owner`,
    so a later start can tell whether the process holding a RUNNING run is gone). Values are
    redacted: a tag may quote a config that holds a credential."""
    if not tags.get(names.ROLE):
        raise ValueError(f"a run needs a {names.ROLE} tag; got {sorted(tags)}")
    tags = {**tags, names.OWNER: owner or owner_tag()}
    run = c.create_run(experiment_id, run_name=run_name,
                       tags={k: redact(str(v)) for k, v in tags.items()})
    return run.info.run_id


def experiment_id(tracking: TrackingConfig) -> str:
    """The experiment, created if needed, marked as model development: MLflow 3's UI opens an
    experiment without that tag on its GenAI overview (traces, token usage: all empty here);
    with it, on the runs table and charts that compare our runs. It holds our saved chart view
    (tasks/tracking/ui_view.py), which `ui_path` opens."""
    c = client(tracking)
    exp = c.get_experiment_by_name(tracking.experiment)
    if exp is None:
        eid = c.create_experiment(tracking.experiment,
                                  artifact_location=tracking.artifact_location,
                                  tags={names.EXPERIMENT_KIND: names.KIND_MODEL_DEVELOPMENT})
        tags: dict[str, str] = {}
    else:
        eid, tags = exp.experiment_id, exp.tags
        if tags.get(names.EXPERIMENT_KIND) != names.KIND_MODEL_DEVELOPMENT:
            c.set_experiment_tag(eid, names.EXPERIMENT_KIND, names.KIND_MODEL_DEVELOPMENT)
    ui_view.ensure(c, eid, tags, tracking.tracking_uri)
    return eid


def ui_path(experiment_id: str, tracking_uri: Optional[str] = None) -> str:
    """The MLflow UI page that compares the methods: the experiment's runs in the model-training
    workflow (MLflow 3.17 opens a new browser on its GenAI pages otherwise), in chart view, in
    our saved view (ui_view.py: accuracy, time and memory against the reference on the first
    screen, one bar per aggregate run). The view's key only where the installed MLflow is the
    one the view is written for, and, given the store, only when the experiment holds it: the
    UI sends a key it cannot find to the GenAI overview."""
    page = (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            "&compareRunsMode=CHART")
    if not ui_view.installed_is_pinned():
        return page
    if tracking_uri is not None:
        tags = client_at(tracking_uri).get_experiment(experiment_id).tags
        if ui_view.read_envelope(tags.get(ui_view.tag_key())) is None:
            return page
    return f"{page}&{names.SHARE_KEY_PARAM}={names.UI_VIEW_ID}"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'training': {'lr': 1e-4}} -> {'training.lr': '0.0001'}; lists of models by name/index."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{v.get('name', i)}."))
    else:
        out[prefix[:-1]] = str(tree)[:MAX_PARAM]
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_params(run_id: str, tracking: TrackingConfig, params: dict[str, str]) -> None:
    c, items = client(tracking), [Param(k, redact(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, tracking: TrackingConfig, metrics: dict[str, float],
                step: int = 0) -> None:
    now = get_current_time_millis()
    client(tracking).log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                                for k, v in metrics.items()])


class MetricBuffer:
    """Per-step metrics kept in memory and written in batches (MLflow takes 1000 a call), so
    the training loop does not wait on the store every `log_every` steps. A batch goes out when
    it is full or its oldest metric is `max_age_s` old, so the MLflow UI's curves (and whoever
    waits for a run to be training) see a run live, seconds behind. `flush` at the end, and in
    a `finally`, so a failing run keeps what it logged."""

    def __init__(self, run_id: str, tracking: TrackingConfig, max_items: int = 1000,
                 max_age_s: float = 5.0):
        self.run_id, self.tracking = run_id, tracking
        self.max_items, self.max_age_ms = max_items, max_age_s * 1000
        self.items: list[Metric] = []
        self.down = False  # the server was lost: the `finally` flush must not wait again

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = get_current_time_millis()
        self.items += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if (len(self.items) >= self.max_items
                or now - self.items[0].timestamp >= self.max_age_ms):
            self.flush()

    def flush(self) -> None:
        if self.down and not outage.reachable_now(self.tracking):
            return
        if self.items:
            try:  # MLflow's client retries for about a minute (tasks/tracking/outage.py): a short outage passes
                client(self.tracking).log_batch(self.run_id, metrics=self.items)
            except Exception as e:
                if (down := outage.lost(self.tracking, e)) is not None:
                    self.down = True
                    raise down from e
                raise
            self.items = []


def log_history(run_id: str, tracking: TrackingConfig, key: str, values: list[float],
                first_step: int = 1) -> None:
    """A whole per-step history in a few calls (MLflow takes 1000 metrics a batch), so the
    training loop never waits on the store."""
    now = get_current_time_millis()
    items = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
    c = client(tracking)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i:i + 1000])


def open_run(cfg: BenchConfig, tags: dict[str, str], run_name: str,
             params: dict[str, str]) -> str:
    """A benchmark parent or a (method, seed) child in the config's experiment, with its params
    and the weights' SHA-256 when the model is pinned (checked before loading)."""
    if digest := pinned_digest(cfg.model):
        tags = {**tags, names.MODEL_SHA256: digest}
    run_id = new_run(client(cfg.tracking), experiment_id(cfg.tracking), run_name, tags)
    log_params(run_id, cfg.tracking, params)
    return run_id


def fail_run(tracking: TrackingConfig, run_id: str, why: str) -> None:
    """End a run FAILED, with the reason in the `peft_bench.error` tag."""
    c = client(tracking)
    c.set_tag(run_id, names.ERROR, redact(why)[:5000])
    c.set_terminated(run_id, "FAILED")


def end_run(tracking: TrackingConfig, run_id: str, error: Optional[BaseException] = None) -> None:
    """FINISHED, or FAILED with the reason; after an outage only if the server is back (else
    the run is left to the next start's stale-run check, and the exit comes in bounded time)."""
    if outage.caused_by_outage(error) and not outage.reachable_now(tracking):
        return
    if error is not None:
        fail_run(tracking, run_id, describe(error))
    else:
        client(tracking).set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def closing_run(tracking: TrackingConfig, run_id: str, system_metrics: bool = False) -> Iterator[str]:
    """Ends the run FINISHED, or FAILED with the error as a tag, whatever happens inside
    (KeyboardInterrupt included), after stopping its system-metrics sampler."""
    monitor = None
    if system_metrics and tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking.system_metrics_interval_s,
                                       tracking_uri=tracking.tracking_uri)
        monitor.start()
    error: Optional[BaseException] = None
    try:
        yield run_id
    except BaseException as e:
        error = e
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        end_run(tracking, run_id, error)


def set_tags(run_id: str, tracking: TrackingConfig, tags: dict[str, str]) -> None:
    client(tracking).log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


def find_child(tracking: TrackingConfig, parent_run_id: str, method: str, seed: int,
               point: str = "default"):
    """The latest child run of a parent for one (method, seed, grid point label), or None."""
    c = client(tracking)
    eid = store.experiment_id(c, tracking.experiment)
    if eid is None:
        return None
    query = store.Query({names.PARENT: parent_run_id, names.METHOD: method,
                         names.SEED: str(seed), names.POINT: point})
    return store.first(c, eid, query)


def log_artifact(run_id: str, tracking: TrackingConfig, path: Path,
                 artifact_path: Optional[str] = None) -> None:
    c = client(tracking)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def dataset_source(source: str):
    """MLflow's dataset source for a local folder or a hub dataset id."""
    from mlflow.data.dataset_source_registry import _dataset_source_registry as registry
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from tasks.config.build import looks_local

    if not looks_local(source):
        return HuggingFaceDatasetSource(path=source)
    local = next(s for s in registry.sources if s._get_source_type() == "local")
    return local._resolve(str(Path(source).expanduser()))


def log_dataset(run_id: str, tracking: TrackingConfig, df, name: str, source: str,
                context: str) -> str:
    """Dataset lineage (mlflow.data), with the digest MLflow computes over the rows."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    # An explicit source object (a string would match MLflow's two registered local sources and
    # warn), and labels as floats (an integer column makes MLflow warn that it cannot hold
    # missing values: the logged copy is lineage, not what trains).
    ds = mlflow.data.from_pandas(df.astype({"label": "float64"}), source=dataset_source(source),
                                 name=name, targets="label")
    entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(names.DATA_CONTEXT, context)])
    client(tracking).log_inputs(run_id, datasets=[entity])
    return ds.digest


def log_config(run_id: str, cfg: BenchConfig) -> None:
    """The resolved config (defaults, mlflow.yaml and overrides applied) as config.yaml."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / names.CONFIG_FILE
        path.write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
        log_artifact(run_id, cfg.tracking, path)


def check_reachable(tracking: TrackingConfig, timeout_s: float = 20.0) -> None:
    """Fail fast on an MLflow server that does not answer: MLflow's own client retries for
    minutes before giving up. Local stores (sqlite, files) need no check. Credentials in the
    URI (user:password@) are sent as basic auth, as MLflow's client does."""
    import time

    import httpx

    uri = tracking.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(uri.rstrip("/") + "/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1)
    raise ConnectionError(redact(f"tracking.tracking_uri: MLflow server {uri} is unreachable "
                                 f"({last}); start it or fix MLFLOW_TRACKING_URI"))


def _fail_open(tracking: TrackingConfig, tags: dict[str, str], why: str) -> list[str]:
    """Close as FAILED every RUNNING run of the experiment with these tags."""
    c = client(tracking)
    eid = store.experiment_id(c, tracking.experiment)
    if eid is None:
        return []
    runs = store.running(c, eid, tags)
    for run in runs:
        fail_run(tracking, run.info.run_id, why)
    return [r.info.run_id for r in runs]


def fail_open_runs(tracking: TrackingConfig, flow_run_id: str, why: str) -> list[str]:
    """Close as FAILED every RUNNING MLflow run a (crashed) Prefect flow run left behind."""
    return _fail_open(tracking, {names.FLOW_RUN_ID: flow_run_id}, why)


def fail_open_children(tracking: TrackingConfig, parent_run_id: str, why: str) -> list[str]:
    """Close as FAILED the RUNNING child runs of a parent run."""
    return _fail_open(tracking, {names.PARENT: parent_run_id}, why)
