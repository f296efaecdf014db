"""The one typed config. YAML files, CLI `--set` overrides and flow parameters all go through
`BenchConfig`, so a bad value is refused in the same words wherever it comes from."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from peft_modules.spec import AdapterSpec

DType = Literal["float32", "bfloat16", "float16"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name_or_path: str = "openai-community/gpt2"
    revision: Optional[str] = None
    dtype: DType = "float32"
    trust_remote_code: bool = False


class DataConfig(_Strict):
    source: str = Field("stanfordnlp/sst2", description="hub dataset id, or a local folder/file")
    text_column: str = "sentence"
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    train_size: Optional[int] = Field(None, gt=0)
    eval_size: Optional[int] = Field(None, gt=0)
    subset: Literal["random", "first"] = Field(
        "random", description="how train_size/eval_size pick rows: a seeded sample or the first")
    max_length: int = Field(128, ge=2, le=8192)
    num_labels: Optional[int] = Field(
        None, ge=2, description="number of classes; inferred from the training split if unset")
    allow_smaller: bool = Field(
        False, description="accept train_size/eval_size above the rows available (all are used)")
    seed: int = 42


class QuantConfig(_Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "float32"


class MethodConfig(AdapterSpec):
    """One benchmarked method: an adapter spec plus what the pipeline needs around it."""

    name: str = Field(..., min_length=1, pattern=r"^[\w.\-]+$")
    quantization: Optional[QuantConfig] = None
    lr: Optional[float] = Field(None, gt=0, description="overrides training.lr for this method")

    @model_validator(mode="after")
    def _quant_default(self):
        if self.quantized and self.quantization is None:
            object.__setattr__(self, "quantization", QuantConfig())
        if not self.quantized and self.quantization is not None:
            raise ValueError(f"quantization is only for qlora/qdora, not method {self.method!r}")
        return self

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(**{k: getattr(self, k) for k in AdapterSpec.model_fields})


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; wins over epochs")
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    seed: int = 42
    seeds: Optional[list[int]] = Field(
        None, min_length=1, description="repeat every method under each seed (wins over seed)")
    eval_every: Optional[int] = Field(None, gt=0, description="evaluate every N optimizer steps")
    log_every: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast on CUDA")
    eval_batch_size: int = Field(64, gt=0)
    num_threads: Optional[int] = Field(None, gt=0, description="torch CPU threads")
    group_by_length: bool = Field(
        False, description="batch rows of similar length (shuffled chunks, sorted within): "
        "less padding, as transformers' group_by_length")
    fused_adamw: Optional[bool] = Field(
        None, description="torch's fused AdamW kernel; default: on for CUDA, off elsewhere")
    checkpoint_every: Optional[int] = Field(
        200, gt=0, description="optimiser steps between checkpoints; null: none")
    checkpoint_dir: Path = Field(Path(".checkpoints"),
                                 description="checkpoints go to <checkpoint_dir>/<MLflow run id>")
    keep_checkpoints: bool = Field(False, description="keep them after a run finishes")
    timing_warmup_steps: int = Field(
        3, ge=0, description="first optimiser steps left out of the median step time")
    contamination_threshold: float = Field(
        0.2, gt=0, le=1, description="share of the machine other processes may take before a "
        "method's timings are flagged as contaminated")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @property
    def run_seeds(self) -> list[int]:
        """The seeds every method runs under: `seeds`, else the single `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]


class TrackingConfig(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "peft-bench"
    artifact_location: Optional[str] = None
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(5.0, gt=0)
    log_weights: bool = Field(True, description="log adapter (or full) weights as artifacts")


class ConcurrencyConfig(_Strict):
    """A Prefect global concurrency limit taken while a method loads, trains and evaluates, so
    one worker host never runs two methods on one GPU at once."""

    slot: Optional[str] = Field("gpu", description="limit name; null disables it")
    limit: int = Field(1, gt=0, description="slots the benchmark creates the limit with")


class ReportConfig(_Strict):
    output_dir: Path = Path("reports")
    reference: Optional[str] = Field(
        None, description="method the others are compared with (default: the first method)")


class RegressionConfig(_Strict):
    """The alarm that compares a benchmark with earlier runs of the same benchmark and config.

    A method is flagged when its new mean is worse than the history's by more than
    max(floor, sigmas × noise), noise = √(s_hist² + se_new²): s_hist the std of the earlier
    runs' means, se_new the standard error of the new mean over its seeds."""

    enabled: bool = True
    window: int = Field(5, gt=0, description="earlier FINISHED runs compared with")
    sigmas: float = Field(3.0, ge=0, description="how many noise units a change must exceed")
    accuracy_drop: float = Field(0.01, ge=0, description="absolute accuracy floor (0.01 = 1 pt)")
    time_rise: float = Field(0.10, ge=0, description="relative train-time floor (0.10 = +10%)")
    memory_rise: float = Field(0.05, ge=0, description="relative peak-memory floor")
    fail_on_regression: bool = Field(False, description="end the flow run FAILED on a flag")


class BenchConfig(_Strict):
    name: str = Field("benchmark", min_length=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    methods: list[MethodConfig] = Field(..., min_length=1)
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()
    dispatch: Literal["local", "deployments"] = "local"
    finetune_deployment: str = Field("finetune/finetune",
                                     description="deployment the `deployments` dispatch runs")
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    regression: RegressionConfig = RegressionConfig()

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: duplicate method names {dup}")
        ref = self.report.reference
        if ref is not None and ref not in names:
            raise ValueError(f"report.reference: {ref!r} is not a method name (methods: {names})")
        return self

    @property
    def reference(self) -> str:
        """The method every other is compared with: report.reference, else the first."""
        return self.report.reference or self.methods[0].name

    def runs(self) -> list[tuple[int, int, str]]:
        """(seed index, seed, method name) for every run, in run order. The method order
        rotates by one position per seed, so slow drift of the machine (thermal, a neighbour
        job) falls on every method alike rather than always on the last one."""
        names = [m.name for m in self.methods]
        out = []
        for i, seed in enumerate(self.training.run_seeds):
            k = i % len(names)
            out += [(i, seed, name) for name in names[k:] + names[:k]]
        return out

    def for_seed(self, seed: int) -> "BenchConfig":
        """The config one child run sees: `training.seed` set to its seed."""
        training = self.training.model_copy(update={"seed": seed})
        return self.model_copy(update={"training": training})

    def select(self, names: list[str]) -> "BenchConfig":
        """Keep only the named methods (CLI `--methods`), refusing unknown names."""
        known = [m.name for m in self.methods]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {unknown}; the config has {known}")
        kept = [m for m in self.methods if m.name in names]
        report = self.report
        if report.reference is not None and report.reference not in names:
            report = report.model_copy(update={"reference": None})  # first kept method
        return self.model_copy(update={"methods": kept, "report": report})


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
                                     "keep_checkpoints"}, "dispatch": True,
                        "finetune_deployment": True, "concurrency": True, "tracking": True,
                        "report": True, "regression": True}


def fingerprint(cfg: BenchConfig) -> str:
    """A short hash of the config as far as it decides the numbers (regression history key)."""
    import hashlib
    import json

    tree = cfg.model_dump(mode="json", exclude=_FINGERPRINT_EXCLUDE)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


# Config fields that may hold credentials (a database URI, a private hub mirror, a signed URL).
SECRET_FIELDS = (("tracking", "tracking_uri"), ("model", "name_or_path"), ("data", "source"))


def public_dump(cfg: BenchConfig) -> dict:
    """The config as JSON with credentials masked: what flow parameters, MLflow params and the
    logged config.yaml hold. The real values are remembered in this process (`revealed`)."""
    from tasks.secrets import redact_tree, register

    for section, field in SECRET_FIELDS:
        register(getattr(getattr(cfg, section), field))
    return redact_tree(cfg.model_dump(mode="json"))


def revealed(cfg: BenchConfig) -> BenchConfig:
    """The config with masked credentials put back, where this process knows them; the
    environment's MLFLOW_TRACKING_URI (a worker's) wins for the store, as everywhere."""
    from tasks.secrets import MASK, reveal

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
