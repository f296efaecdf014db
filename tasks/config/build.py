"""Reading a config: YAML files, `--set key=value` overrides, mlflow.yaml and the environment,
into the one typed `BenchConfig`; and what is derived from a config (its fingerprint, its
public form with credentials masked). Re-exported by `tasks.config.schema`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tasks.config.schema import HUB_ID, BenchConfig, ConfigError


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` pairs; the value is parsed as YAML so numbers and lists keep their type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            _set_dotted(raw, key.strip(), yaml.safe_load(value))
        except (ValueError, IndexError) as e:
            raise ConfigError(f"--set {key}: {e}") from e
    return raw


def tracking_from_files(mlflow_yaml: Path | None) -> dict:
    """mlflow.yaml supplies the tracking section; MLFLOW_* environment variables win."""
    tracking: dict = {}
    if mlflow_yaml is not None and mlflow_yaml.is_file():
        tracking = yaml.safe_load(mlflow_yaml.read_text()) or {}
    env = {
        "MLFLOW_TRACKING_URI": "tracking_uri",
        "MLFLOW_EXPERIMENT_NAME": "experiment",
        "MLFLOW_ARTIFACT_LOCATION": "artifact_location",
    }
    for var, key in env.items():
        if os.environ.get(var):
            tracking[key] = os.environ[var]
    return tracking


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def build_config(raw: dict, source: str = "config", overrides: list[str] = (),
                 mlflow_yaml: Path | None = Path("mlflow.yaml")) -> BenchConfig:
    raw = apply_overrides(dict(raw), list(overrides))
    tracking = {**tracking_from_files(mlflow_yaml), **(raw.get("tracking") or {})}
    # Environment variables beat both files.
    tracking.update(tracking_from_files(None))
    raw["tracking"] = tracking
    try:
        return BenchConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: list[str] = (),
                mlflow_yaml: Path | None = Path("mlflow.yaml")) -> BenchConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return build_config(raw, str(path), overrides, mlflow_yaml)


def cache_root() -> Path:
    """peft-bench's own cache (prepared data, temporary-server records): PEFT_BENCH_CACHE, else
    ~/.cache/peft-bench."""
    return Path(os.environ.get("PEFT_BENCH_CACHE", Path.home() / ".cache" / "peft-bench"))


def looks_local(name_or_path: str) -> bool:
    """A hub id is `org/name` or `name`; anything that exists, or starts like a path, is local."""
    p = Path(name_or_path).expanduser()
    return p.exists() or name_or_path.startswith((".", "/", "~")) or not HUB_ID.match(name_or_path)


# What a config fingerprint leaves out: the seeds (repeats of the same experiment), where the
# work runs (dispatch, concurrency), where results go (tracking, report) and the alarm's own
# thresholds. Two benchmarks with the same fingerprint measure the same thing.
_FINGERPRINT_EXCLUDE = {"training": {"seed", "seeds", "checkpoint_every", "checkpoint_dir",
                                     "keep_checkpoints", "keep_last"}, "dispatch": True,
                        "finetune_deployment": True, "concurrency": True, "tracking": True,
                        "report": True, "regression": True,
                        "sweep": {"reuse", "max_runs"}}


def fingerprint(cfg: BenchConfig) -> str:
    """A short hash of the config as far as it decides the numbers (regression history key)."""
    import hashlib
    import json

    # Only what the config sets: a field added to the schema later (with a default) must not
    # break the history; a changed default is a code change, which the alarm is there to see.
    tree = cfg.model_dump(mode="json", exclude=_FINGERPRINT_EXCLUDE, exclude_defaults=True)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


# Config fields that may hold credentials (a database URI, a private hub mirror, a signed URL).
SECRET_FIELDS = (("tracking", "tracking_uri"), ("model", "name_or_path"), ("data", "source"))


def public_dump(cfg: BenchConfig) -> dict:
    """The config as JSON with credentials masked: what flow parameters, MLflow params and the
    logged config.yaml hold. The real values are remembered in this process (`revealed`)."""
    from tasks.common.secrets import redact_tree, register

    for section, field in SECRET_FIELDS:
        register(getattr(getattr(cfg, section), field))
    return redact_tree(cfg.model_dump(mode="json"))


def revealed(cfg: BenchConfig) -> BenchConfig:
    """The config with masked credentials put back, where this process knows them; the
    environment's MLFLOW_TRACKING_URI (a worker's) wins for the store, as everywhere."""
    from tasks.common.secrets import MASK, reveal

    update = {}
    for section, field in SECRET_FIELDS:
        part = getattr(cfg, section)
        value = reveal(getattr(part, field))
        if section == "tracking" and os.environ.get("MLFLOW_TRACKING_URI"):
            value = os.environ["MLFLOW_TRACKING_URI"]
        if MASK in value and value == getattr(part, field):
            raise ConfigError(f"{section}.{field}: holds masked credentials ({value}) that this "
                              "process does not know; give the real value through the "
                              "environment (MLFLOW_TRACKING_URI) or --set")
        update[section] = part.model_copy(update={field: value})
    return cfg.model_copy(update=update)
