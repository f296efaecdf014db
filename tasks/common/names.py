"""The one vocabulary of MLflow names: every metric and tag that a run writes and that the
report, the CLI, the regression alarm or the benchmarks read is declared here, once.

A renamed metric used to show as "—" with no error; now writer and reader share the constant,
and `tests/test_names.py` fails when product code spells a name out instead of importing it,
or when a name declared here is never written by a real run.
"""
from __future__ import annotations

# ------------------------------------------------------------------ per-step histories
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
STEP_TIME = "train/step_time_s"          # wall time of each optimiser step (eval excluded)
EVAL_ACCURACY = "eval/accuracy"
EVAL_F1 = "eval/f1_macro"
EVAL_PRECISION = "eval/precision"
EVAL_RECALL = "eval/recall"
EVAL_LOSS = "eval/loss"
EVAL_RATE = "eval/samples_per_s"

# ------------------------------------------------------------------ one value per child run
TRAIN_TIME = "train_time_s"
STEP_TIME_MEDIAN = "step_time_median_s"  # median step time once the warm-up steps are left out
SAMPLES_PER_S = "samples_per_s"
TOKENS_PER_S = "tokens_per_s"
TRAIN_STEPS = "train_steps"
PEAK_MEMORY = "peak_memory_mb"
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
TRAINABLE_PCT = "trainable_pct"
MODEL_SIZE = "model_size_mb"
ADAPTER_SIZE = "adapter_size_mb"
EVAL_TIME = "eval_time_s"
PERIODIC_EVAL_TIME = "periodic_eval_time_s"
EVAL_SAMPLES_PER_S = "eval_samples_per_s"
OTHER_CPU_SHARE = "other_cpu_share"      # share of the machine other processes took (0..1)
OTHER_GPU_PROCS = "other_gpu_processes"  # most other processes seen on our GPU at once

# Summary key (what the report and the aggregates call a number) -> the child metric holding
# it. For histories (eval/*) MLflow's stored value is the one logged at the largest step,
# i.e. the final evaluation.
CHILD_METRICS = {
    "accuracy": EVAL_ACCURACY, "f1_macro": EVAL_F1, "eval_loss": EVAL_LOSS,
    "precision": EVAL_PRECISION, "recall": EVAL_RECALL,
    "train_time_s": TRAIN_TIME, "step_time_median_s": STEP_TIME_MEDIAN,
    "eval_time_s": EVAL_TIME, "samples_per_s": SAMPLES_PER_S, "tokens_per_s": TOKENS_PER_S,
    "eval_samples_per_s": EVAL_SAMPLES_PER_S, "peak_memory_mb": PEAK_MEMORY,
    "trainable_params": TRAINABLE_PARAMS, "total_params": TOTAL_PARAMS,
    "trainable_pct": TRAINABLE_PCT, "model_size_mb": MODEL_SIZE, "adapter_size_mb": ADAPTER_SIZE,
    "train_steps": TRAIN_STEPS, "other_cpu_share": OTHER_CPU_SHARE,
}
INTEGER_KEYS = ("trainable_params", "total_params", "train_steps")

# ------------------------------------------------------------------ aggregates (one run a method)
# The numbers the issue asks to aggregate over seeds: mean, std and a 95% Student-t interval.
AGGREGATED = ("accuracy", "f1_macro", "eval_loss", "train_time_s", "step_time_median_s",
              "samples_per_s", "tokens_per_s", "peak_memory_mb")
STATS = ("mean", "std", "ci_low", "ci_high")
N_SEEDS = "n_seeds"


def agg(key: str, stat: str) -> str:
    """`agg("accuracy", "mean")` -> "accuracy_mean": the aggregate run's metric name."""
    if key not in AGGREGATED or stat not in STATS:
        raise KeyError(f"no aggregate metric for {key!r}/{stat!r}")
    return f"{key}_{stat}"


# Paired comparison with the reference method, on the aggregate runs of the other methods.
ACC_DIFF = "acc_diff_vs_ref"        # accuracy difference (method − reference), mean and CI
TIME_RATIO = "time_ratio_vs_ref"    # train time ratio (method / reference), geometric mean
MEMORY_RATIO = "memory_ratio_vs_ref"
MCNEMAR_P = "mcnemar_p"             # McNemar's exact p per seed (step = seed)
PAIRED = (ACC_DIFF, TIME_RATIO, MEMORY_RATIO)
PAIRED_STATS = ("mean", "ci_low", "ci_high")


def paired(key: str, stat: str) -> str:
    if key not in PAIRED or stat not in PAIRED_STATS:
        raise KeyError(f"no paired metric for {key!r}/{stat!r}")
    return f"{key}_{stat}"


# ------------------------------------------------------------------ tags
PARENT = "mlflow.parentRunId"            # MLflow's own nesting tag
# The experiment tag MLflow 3.17's UI reads to pick an experiment's first page; its values (in
# the UI's ExperimentKind enum) include "genai_development" and "custom_model_development".
EXPERIMENT_KIND = "mlflow.experimentKind"
KIND_MODEL_DEVELOPMENT = "custom_model_development"
RUN_NOTE = "mlflow.note.content"         # MLflow's run description
DATA_CONTEXT = "mlflow.data.context"     # a dataset input's role: train / eval / test
ROLE = "peft_bench.role"
ROLE_PARENT, ROLE_CHILD, ROLE_AGGREGATE = "parent", "child", "aggregate"
ROLE_GRID = "grid"                       # a sweep's grid point: a child of its method's run
BENCHMARK = "peft_bench.benchmark"
BENCHMARK_RUN = "peft_bench.benchmark_run"  # on aggregate runs: the parent run they summarise
METHOD = "peft_bench.method"
METHOD_KIND = "peft_bench.method_kind"
METHODS = "peft_bench.methods"           # on the parent: the config's method names, in order
SEED = "peft_bench.seed"
SEED_INDEX = "peft_bench.seed_index"     # position of the seed in training.seeds
REFERENCE = "peft_bench.reference"
ERROR = "peft_bench.error"
RANDOM_INIT = "peft_bench.random_init"
MODEL_SHA256 = "peft_bench.model_sha256"  # a packaged model's pinned weights digest
GIT_SHA = "peft_bench.git_sha"
DEVICE = "peft_bench.device"
DATA_DIGEST = "peft_bench.data_digest"
DATA_SOURCE = "peft_bench.data_source"
CONFIG_HASH = "peft_bench.config_hash"   # config with seeds, dispatch and outputs left out
FAILED_METHODS = "peft_bench.failed_methods"
FAILED_RUNS = "peft_bench.failed_runs"
WORKER = "peft_bench.worker"
OWNER = "peft_bench.owner"               # host:pid:process start time of whoever has it open
RESUMED = "peft_bench.resumed_from_step"
RESUME_NOTE = "peft_bench.resume_note"   # a checkpoint skipped on resume: which file, and why
POINT = "peft_bench.point"               # a grid point's label, e.g. "lr=0.0003,rank=8"
POINT_JSON = "peft_bench.point_json"     # the same point as JSON, for reading back
CHOSEN = "peft_bench.chosen"             # "true" on the grid run selection picked
CHOSEN_POINT = "peft_bench.chosen_point"  # on a method's run: the chosen point (JSON)
EVAL_SPLIT = "peft_bench.eval_split"     # the split this run is scored on
RUN_KEY = "peft_bench.run_key"           # settings + data + code: equal keys, equal runs
REUSED_FROM = "peft_bench.reused_from"   # a copy of this earlier FINISHED run, not retrained
CONTAMINATED = "peft_bench.timing_contaminated"  # "true"/"false" on child runs
TIMING_WARNING = "peft_bench.timing_warning"
REGRESSIONS = "peft_bench.regressions"           # JSON list of flags on the parent
REGRESSION_BASELINES = "peft_bench.regression_baselines"
FLOW_RUN_ID = "prefect.flow_run_id"
FLOW_RUN_NAME = "prefect.flow_run_name"
FLOW_RUN_URL = "prefect.flow_run_url"

# ------------------------------------------------------------------ artifacts and events
PREDICTIONS = "predictions.csv"
ADAPTER_ARTIFACTS = "adapter"  # peft's layout for adapters; every trained tensor for full
REPORT_ARTIFACTS = "report"
PREFECT_REPORT_KEY = "peft-bench-report"
PREFECT_REGRESSION_KEY = "peft-bench-regressions"
REGRESSION_EVENT = "peft-bench.regression.detected"
PROGRESS_LOGGER = "peft_bench.progress"  # our progress lines, the console's only source
LOG_ARTIFACTS = "logs"                   # the run's full log, on the parent run

# ------------------------------------------------------------------ labels (tasks/data/labels.py)
LABEL_NAMES = "peft_bench.label_names"   # on child runs with class names: JSON list, by id
