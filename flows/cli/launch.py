"""What `peft-bench run` does before the benchmark flow starts, cheapest check first.

1. the config (pydantic; no torch, no Prefect): a config error in about a second;
2. the output folder, the model folder's files and the data (pandas only): a data error in
   seconds;
3. the device, every method's targets on a meta-device model, the MLflow store (created and
   migrated under a lock when new);
4. the runs that killed processes left RUNNING are closed, orphaned temporary servers stopped;
5. only then the temporary Prefect server (if no Prefect API is configured) and the flow.

Each failure is one `LaunchError` with the exit code the CLI gives: 2 for bad input, 4 when a
service (the MLflow store, the Prefect server) cannot be reached or started.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import yaml

from tasks.common import names
from tasks.common.secrets import redact, register
from tasks.config.build import build_config, load_config, tracking_from_files
from tasks.config.schema import BenchConfig, ConfigError

BAD_INPUT, SERVICE = 2, 4


class LaunchError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(redact(message))
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM in the CLI, raised in the main thread like Ctrl-C, so that everything that
    cleans up after an interrupt (closing_run, Prefect's engine, the temporary server) does it
    for SIGTERM too. Prefect's flow engine turns SIGTERM into its own TerminationSignal while a
    flow runs and re-sends the signal to the handler it replaced (this one) once the flow run
    is marked crashed; both end in the CLI's exit 143 (128 + 15, as a shell reports it)."""

    def __init__(self, sig: int = 15):
        super().__init__()
        self.signal = sig


EXIT_TERMINATED = 143


def on_sigterm():
    """Install the SIGTERM handler (main thread only, as Python requires); returns the one it
    replaced, for the caller to put back (the CLI may run inside another program, e.g. tests)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up must not be cut
        raise Terminated(signum)

    return signal.signal(signal.SIGTERM, handler)


def mask_overrides(overrides: list[str]) -> list[str]:
    """`key=value` overrides with credentials masked (they become flow parameters, stored by
    Prefect); this process remembers the real values."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{key}{sep}{register(value)}" if sep else item)
    return out


def resumed_config(parent_run_id: str, overrides: list[str]) -> dict:
    """The resolved config an earlier benchmark logged (config.yaml on its parent run)."""
    from mlflow.exceptions import MlflowException

    raw = {"tracking": tracking_from_files(Path("mlflow.yaml"))}
    tracking = build_config({**raw, "methods": [{"name": "x", "method": "full"}]}, "resume",
                            [o for o in overrides if o.startswith("tracking.")]).tracking
    from tasks.tracking import runs
    from tasks.tracking.store import UnknownRun, get_run

    client = runs.client(tracking)
    try:
        get_run(client, parent_run_id, "--resume run")
    except UnknownRun as e:
        raise LaunchError(str(e), BAD_INPUT) from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent_run_id, names.CONFIG_FILE, tmp)
            config = yaml.safe_load(Path(path).read_text())
    except MlflowException as e:
        raise LaunchError(f"--resume {parent_run_id}: no such benchmark run with a config in "
                          f"{tracking.tracking_uri} ({e.message})", BAD_INPUT) from None
    config["tracking"] = {**config.get("tracking", {}), **tracking.model_dump(mode="json")}
    return config


def load(config_path: Optional[Path], overrides: list[str], methods: Optional[list[str]],
         resume: Optional[str]) -> tuple[BenchConfig, Optional[dict]]:
    """The config, and the dict to hand the flow when it does not come from a file."""
    if (config_path is None) == (resume is None):
        raise LaunchError("give a config file, or --resume PARENT_RUN_ID", BAD_INPUT)
    try:
        if resume:
            as_dict = resumed_config(resume, overrides)
            cfg = build_config(dict(as_dict), f"run {resume}", overrides)
        else:
            as_dict, cfg = None, load_config(config_path, overrides)
        return (cfg.select(methods) if methods else cfg), as_dict
    except ConfigError as e:
        raise LaunchError(str(e), BAD_INPUT) from None


def check_light(cfg: BenchConfig) -> None:
    """Step 2 above: the output folder, the model folder's files, the data."""
    from tasks import preflight
    from tasks.data.labels import DataError

    try:
        preflight.check_light(cfg)
    except (ConfigError, DataError) as e:
        raise LaunchError(str(e), BAD_INPUT) from None


def check(cfg: BenchConfig, log) -> None:
    """Steps 3-4 above; `check_light` (step 2) comes first."""
    from tasks.data.labels import DataError
    from tasks.preflight import check_heavy

    try:
        skipped = check_heavy(cfg)
    except (ConfigError, DataError) as e:
        raise LaunchError(str(e), BAD_INPUT) from None
    except ConnectionError as e:
        raise LaunchError(str(e), SERVICE) from None
    if skipped:
        log(skipped)
    from tasks.tracking.lifecycle import close_stale_runs

    for run_id in close_stale_runs(cfg.tracking):
        log(f"closed stale MLflow run {run_id}: the process that ran it is gone")


def server(timeout_s: Optional[float]):
    from flows.infra import tempserver

    try:
        return tempserver.ensure(timeout_s)
    except tempserver.ServerStartError as e:
        raise LaunchError(str(e), SERVICE) from None
