"""The one typed config. YAML files, CLI `--set` overrides and flow parameters all go through
`BenchConfig`, so a bad value is refused in the same words wherever it comes from."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peft_modules.spec import AdapterSpec
from tasks.config.distributed import DistributedConfig, check_distributed
from tasks.config.peft_block import OptimizerConfig, apply_point, check_block, check_method
from tasks.config.sweep import SweepConfig, check_grid, check_sweep, method_grid, split_point

DType = Literal["float32", "bfloat16", "float16"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """The base model: a `...ForSequenceClassification` model of any family transformers knows."""

    name_or_path: str = Field(
        "openai-community/gpt2", description="hub model id, local folder, or package:NAME (a model "
        "inside an installed Python package, its weights' SHA-256 pinned in tasks/models/source.py)")
    revision: Optional[str] = Field(None, description="hub revision: branch, tag or commit")
    dtype: DType = Field("float32", description="the dtype the float weights are loaded in")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model (off: transformers' own "
                           "architectures only)")


class DataConfig(_Strict):
    """The rows: a hub dataset or a local folder of train/validation(/test) files (TSV, CSV, JSONL
    or Parquet), checked and subset before any model loads."""

    source: str = Field("stanfordnlp/sst2", description="hub dataset id, or a local folder/file")
    hub_config: Optional[str] = Field(
        None, description="the hub dataset's configuration, e.g. 'mrpc' of nyu-mll/glue")
    text_column: Union[str, list[str]] = Field(
        "sentence", description="the text column, or two (a sentence pair: MRPC, QNLI, RTE, "
                                "MNLI), tokenised as the tokenizer's pair encoding")
    label_column: str = Field(
        "label", description="the label column: integer ids or class names, one kind in all splits")
    train_split: str = Field(
        "train", description="the split trained on (in a local folder: the file's name)")
    eval_split: str = Field(
        "validation", description="the split scored on (in a sweep: the selection split)")
    train_size: Optional[int] = Field(
        None, gt=0, description="training rows used (see subset); null: all of them")
    eval_size: Optional[int] = Field(
        None, gt=0, description="evaluation rows used (see subset); null: all of them")
    subset: Literal["random", "first"] = Field(
        "random", description="how train_size/eval_size pick rows: a seeded sample or the first")
    max_length: int = Field(128, ge=2, le=8192,
                            description="tokens per row; longer texts are truncated")
    num_labels: Optional[int] = Field(
        None, ge=2, description="number of classes; inferred from the training split if unset")
    label_names: Optional[list[str]] = Field(
        None, description="the class names by id: fixes the order (and set) of name labels, "
                          "else sorted; with integer labels, names ids 0..n-1 (tasks/data/labels.py)")
    allow_smaller: bool = Field(
        False, description="accept train_size/eval_size above the rows available (all are used)")
    test_split: Optional[str] = Field(
        None, description="held-out split the final runs are scored on (sweeps: never seen "
                          "by selection); the same as eval_split is allowed but optimistic")
    test_from_train: Optional[float] = Field(
        None, gt=0, lt=0.5, description="carve a test split of this share from train (seeded, "
                                        "disjoint from the training rows)")
    test_size: Optional[int] = Field(
        None, gt=0, description="test rows used (see subset); null: all of them")

    @field_validator("text_column")
    @classmethod
    def _one_or_two_columns(cls, v):
        if isinstance(v, list) and not (1 <= len(v) <= 2 and all(v) and len(set(v)) == len(v)):
            raise ValueError(f"give one column or two distinct ones (a pair), got {v}")
        return v

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)

    @model_validator(mode="after")
    def _one_test_source(self):
        if self.test_split is not None and self.test_from_train is not None:
            raise ValueError("give data.test_split or data.test_from_train, not both")
        if self.test_split is not None and self.test_split == self.train_split:
            raise ValueError(f"data.test_split is the training split {self.train_split!r}; "
                             "use data.test_from_train to carve a disjoint part of it")
        return self

    @property
    def has_test(self) -> bool:
        return self.test_split is not None or self.test_from_train is not None
    seed: int = Field(
        42, description="seed of the row subsets and of test_from_train; not training.seed, so "
                        "every training seed evaluates the same rows")


class QuantConfig(_Strict):
    """The 4-bit base of qlora/qdora (bitsandbytes `Linear4bit`); the adapter stays in float32."""

    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base weights")
    double_quant: bool = Field(
        True, description="quantise the quantisation constants too (QLoRA's double quantisation)")
    compute_dtype: DType = Field("float32", description="the dtype the 4-bit layers compute in")


class MethodConfig(AdapterSpec):
    """One benchmarked method: an adapter spec plus what the pipeline needs around it."""

    name: str = Field(..., min_length=1, pattern=r"^[\w.\-]+$",
                      description="the method's name in runs, tables and --methods")
    quantization: Optional[QuantConfig] = Field(
        None, description="the 4-bit base (qlora/qdora: default NF4, double quantisation, "
                          "float32 compute; method: peft: only when set)")
    lr: Optional[float] = Field(None, gt=0, description="overrides training.lr for this method")
    sweep: Optional[dict[str, Any]] = Field(
        None, description="this method's grid; its keys win over sweep.grid")
    peft: Optional[dict[str, Any]] = Field(
        None, description="method: peft only: a Hugging Face peft config, peft_type and that "
                          "config's fields (docs/config.md, method: peft)")
    optimizer: Optional[OptimizerConfig] = Field(
        None, description="the optimiser; null: AdamW (loraplus, lorafa: method: peft, LORA)")

    @field_validator("sweep")
    @classmethod
    def _own_grid(cls, v):
        return None if v is None else check_grid(v, "sweep")

    @field_validator("peft")
    @classmethod
    def _peft_block(cls, v, info):
        return check_block(v, info.data.get("method"))

    @property
    def quantized(self) -> bool:
        # method: peft loads a 4-bit base when its quantization: block is set.
        return super().quantized or (self.method == "peft" and self.quantization is not None)

    @model_validator(mode="after")
    def _quant_default(self):
        check_method(self)
        if self.quantized and self.quantization is None:
            object.__setattr__(self, "quantization", QuantConfig())
        if not self.quantized and self.quantization is not None:
            raise ValueError(f"quantization is only for qlora/qdora/peft, not method "
                             f"{self.method!r}")
        return self

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(**{k: getattr(self, k) for k in AdapterSpec.model_fields})


class TrainingConfig(_Strict):
    """One optimiser and schedule for every method (AdamW), how long, and what each run records."""

    epochs: float = Field(1.0, gt=0, description="passes over the training rows (fractions allowed)")
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; wins over epochs")
    batch_size: int = Field(16, gt=0, description="rows per forward pass")
    grad_accum: int = Field(
        1, gt=0, description="forward passes per optimiser step (batch = batch_size × grad_accum)")
    lr: float = Field(2e-4, gt=0, description="learning rate of every method without its own lr")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate schedule after the warmup")
    warmup_ratio: float = Field(0.06, ge=0, lt=1,
                                description="share of the optimiser steps warming the rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, on matrices only")
    max_grad_norm: Optional[float] = Field(
        1.0, gt=0, description="clip the gradient norm to this; null: no clipping")
    seed: int = Field(
        42, description="seed of data order, adapter and head init, when seeds is unset")
    seeds: Optional[list[int]] = Field(
        None, min_length=1, description="repeat every method under each seed (wins over seed)")
    eval_every: Optional[int] = Field(None, gt=0, description="evaluate every N optimizer steps")
    log_every: int = Field(1, gt=0, description="optimiser steps between logged train/loss and "
                                                "train/lr values")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU; cuda without one is refused")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast on CUDA")
    eval_batch_size: int = Field(64, gt=0, description="rows per forward pass when scoring")
    num_threads: Optional[int] = Field(None, gt=0, description="torch CPU threads")
    group_by_length: bool = Field(
        True, description="batch training rows of similar length (shuffled chunks, sorted "
        "within): less padding, as transformers' group_by_length (docs/measurement.md)")
    eval_sort_by_length: bool = Field(
        True, description="score rows in length-sorted batches (outputs back in file order)")
    fused_adamw: Optional[bool] = Field(
        None, description="torch's fused AdamW kernel; default: on for CUDA, off elsewhere")
    checkpoint_every: Optional[int] = Field(
        200, gt=0, description="optimiser steps between checkpoints; null: none")
    checkpoint_dir: Path = Field(Path(".checkpoints"),
                                 description="checkpoints go to <checkpoint_dir>/<MLflow run id>")
    keep_last: int = Field(
        2, ge=1, description="complete checkpoints kept during a run; the previous one is kept "
        "until the new one is written and verified, so a resume can fall back to it")
    keep_checkpoints: bool = Field(False, description="keep them after a run finishes")
    timing_warmup_steps: int = Field(
        3, ge=0, description="first optimiser steps left out of the median step time")
    contamination_threshold: float = Field(
        0.2, gt=0, le=1, description="share of the machine other processes may take before a "
        "method's timings are flagged as contaminated")
    distributed: Optional[DistributedConfig] = Field(
        None, description="run each method under torchrun over several processes or hosts")

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
    """Where runs are logged. mlflow.yaml supplies this section, a config's tracking: section wins
    over it, and the environment (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
    MLFLOW_ARTIFACT_LOCATION) wins over both."""

    tracking_uri: str = Field("sqlite:///mlflow.db",
                              description="MLflow tracking URI: a sqlite store, or a server's URL")
    experiment: str = Field("peft-bench", description="MLflow experiment name")
    artifact_location: Optional[str] = Field(
        None, description="artifact root of a newly created experiment; null: the store's default")
    system_metrics: bool = Field(True, description="log MLflow's system metrics on every run")
    system_metrics_interval_s: float = Field(5.0, gt=0,
                                             description="seconds between system-metric samples")
    log_weights: bool = Field(True, description="log adapter (or full) weights as artifacts")


class ConcurrencyConfig(_Strict):
    """A Prefect global concurrency limit taken while a method loads, trains and evaluates, so
    one worker host never runs two methods on one GPU at once."""

    slot: Optional[str] = Field("gpu", description="limit name; null disables it")
    limit: int = Field(1, gt=0, description="slots the benchmark creates the limit with")


class ReportConfig(_Strict):
    """The benchmark's report, built from what MLflow holds."""

    output_dir: Path = Field(Path("reports"), description="the report goes to "
                             "<output_dir>/<parent run id>/, the run's log to <output_dir>/logs/")
    reference: Optional[str] = Field(
        None, description="method the others are compared with (default: the first method)")


class RegressionConfig(_Strict):
    """The alarm that compares a benchmark with earlier runs of the same benchmark and config.

    A method is flagged when its new mean is worse than the history's by more than
    max(floor, sigmas × noise), noise = √(s_hist² + se_new²): s_hist the std of the earlier
    runs' means, se_new the standard error of the new mean over its seeds."""

    enabled: bool = Field(True, description="compare each benchmark with its history")
    window: int = Field(5, gt=0, description="earlier FINISHED runs compared with")
    sigmas: float = Field(3.0, ge=0, description="how many noise units a change must exceed")
    accuracy_drop: float = Field(0.01, ge=0, description="absolute accuracy floor (0.01 = 1 pt)")
    time_rise: float = Field(0.10, ge=0, description="relative train-time floor (0.10 = +10%)")
    memory_rise: float = Field(0.05, ge=0, description="relative peak-memory floor")
    time_floor_s: float = Field(0.5, ge=0, description="absolute train-time floor (seconds)")
    memory_floor_mb: float = Field(
        32.0, ge=0, description="absolute peak-memory floor: a CPU run's resident set "
                                "jitters by tens of MB whatever the code does")
    fail_on_regression: bool = Field(False, description="end the flow run FAILED on a flag")


class BenchConfig(_Strict):
    """A benchmark: one model and data set, the methods compared, and how they train."""

    # Any printable text (quotes, spaces, accents): it is an MLflow tag and run name, a
    # Prefect flow-run name and a heading of the HTML report, never a file name. Control
    # characters and padding are refused: they would not survive all of those.
    name: str = Field(
        "benchmark", min_length=1, max_length=200,
        description="the benchmark's name, any printable text; the regression alarm compares "
                    "runs of the same name and config")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    methods: list[MethodConfig] = Field(
        ..., min_length=1, description="the methods compared, in run order; the first is the "
                                       "reference unless report.reference names another")
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()
    dispatch: Literal["local", "deployments"] = Field(
        "local", description="local: every run in this process; deployments: each run a flow run "
                             "of finetune_deployment on Prefect workers (docs/deploy.md)")
    finetune_deployment: str = Field("finetune/finetune",
                                     description="deployment the `deployments` dispatch runs")
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    regression: RegressionConfig = RegressionConfig()
    sweep: Optional[SweepConfig] = Field(
        None, description="a grid per method, each method then run at its best point "
                          "(docs/sweeps.md); null: every method at its config values")

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        if not v.isprintable():
            bad = next(c for c in v if not c.isprintable())
            raise ValueError(f"holds the control character {bad!r}; use printable text")
        if v != v.strip():
            raise ValueError("starts or ends with white space")
        return v

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: duplicate method names {dup}")
        ref = self.report.reference
        if ref is not None and ref not in names:
            raise ValueError(f"report.reference: {ref!r} is not a method name (methods: {names})")
        if self.training.distributed is not None:
            check_distributed(self.training.distributed, self.methods, self.training)
        if any(m.sweep for m in self.methods) and self.sweep is None:
            raise ValueError("a method has a sweep: grid but the config has no sweep: section")
        if self.sweep is not None:
            check_sweep(self.sweep, self.training.eval_every,
                        {m.name: self.method_grid(m) for m in self.methods}, self.with_point)
            jobs = self.grid_jobs()
            for name, point in jobs:  # every value is checked where it will be used
                try:
                    self.with_point(name, point)
                except ValidationError as e:
                    err = e.errors()[0]
                    raise ValueError(f"sweep point {point} of {name}: {err['loc'][0]}: "
                                     f"{err['msg']}") from None
            runs = len(jobs) + len(self.methods) * len(self.training.run_seeds)
            if runs > self.sweep.max_runs:
                raise ValueError(f"sweep: {runs} runs (grid points + finals) exceed "
                                 f"sweep.max_runs = {self.sweep.max_runs}; shrink the grid or "
                                 "raise max_runs if you mean it")
        return self

    def method_grid(self, method: "MethodConfig") -> dict[str, list[Any]]:
        if self.sweep is None:
            return {}
        try:
            return method_grid(self.sweep.grid, method.sweep, method.method)
        except ValueError as e:
            raise ValueError(f"methods {method.name}: {e}") from None

    def grid_jobs(self) -> list[tuple[str, dict[str, Any]]]:
        """(method, point) for every grid run; none without a sweep."""
        if self.sweep is None:
            return []
        return [(m.name, p) for m in self.methods for p in self.sweep.points(self.method_grid(m))]

    def with_point(self, method_name: str, point: dict[str, Any]) -> "BenchConfig":
        """The config one run of a grid point sees: the point's method and training values."""
        on_method, on_training = split_point(point)
        methods = [MethodConfig.model_validate(apply_point(m.model_dump(), on_method))
                   if m.name == method_name else m for m in self.methods]
        training = TrainingConfig.model_validate({**self.training.model_dump(), **on_training})
        return self.model_copy(update={"methods": methods, "training": training})

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
