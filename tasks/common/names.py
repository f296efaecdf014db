"""The one vocabulary of MLflow names: every metric and tag that a run writes and that the
report, the CLI, the regression alarm or the benchmarks read is declared here, once.

A renamed metric used to show as "—" with no error; now writer and reader share the constant,
and `tests/test_names.py` fails when product code spells a name out instead of importing it,
and `tests/test_repeats.py` when a name declared here is never written by a real run. The
summary keys (what the report calls a method's numbers) and the artifact file names are
declared here too, and checked the same way.
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
# Over the training steps, one sample after each optimiser step (tasks/training/memory.py): the
# mean and the 99th percentile, as peft's method_comparison records them. CUDA: memory_reserved;
# CPU: the step's largest resident set. MB above the method's start level, like the peak.
MEMORY_AVG = "memory_avg_mb"
MEMORY_P99 = "memory_p99_mb"
# Under torchrun (training.distributed), PEAK_MEMORY is the largest rank's peak and each rank's
# own is a metric of its own: rank_metric(PEAK_MEMORY, r) -> "peak_memory_mb_rank1".
WORLD_SIZE = "world_size"  # a param of a distributed child run, beside the strategy's
DIST_STRATEGY = "distributed_strategy"


def rank_metric(metric: str, rank: int) -> str:
    return f"{metric}_rank{rank}"


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

# ------------------------------------------------------------------ summary keys
# What the report, the aggregates and the CLI call a method's numbers. Written by
# tasks/analysis/aggregate.py (SeedRun.metrics, GridPoint.metrics and MethodAggregate.stats,
# read from the child runs through CHILD_METRICS) and by tasks/report.py (`method_row`: one row
# per method, summary.json's "methods"); read by tasks/reporting/* (tables, charts, budgets),
# tasks/analysis/regression.py, flows/cli/display.py, and sweep.metric names one
# (tasks/config/sweep.py). tasks/evaluate.py names its scores with the same words.
# A one-value metric's summary key is its metric name (TRAIN_TIME, PEAK_MEMORY, … above); the
# final value of a history has a key of its own:
ACCURACY = "accuracy"
F1_MACRO = "f1_macro"
PRECISION = "precision"
RECALL = "recall"
FINAL_LOSS = "eval_loss"

# Summary key -> the child metric holding it. For histories (eval/*) MLflow's stored value is
# the one logged at the largest step, i.e. the final evaluation.
CHILD_METRICS = {
    ACCURACY: EVAL_ACCURACY, F1_MACRO: EVAL_F1, FINAL_LOSS: EVAL_LOSS,
    PRECISION: EVAL_PRECISION, RECALL: EVAL_RECALL,
    TRAIN_TIME: TRAIN_TIME, STEP_TIME_MEDIAN: STEP_TIME_MEDIAN,
    EVAL_TIME: EVAL_TIME, SAMPLES_PER_S: SAMPLES_PER_S, TOKENS_PER_S: TOKENS_PER_S,
    EVAL_SAMPLES_PER_S: EVAL_SAMPLES_PER_S, PEAK_MEMORY: PEAK_MEMORY,
    MEMORY_AVG: MEMORY_AVG, MEMORY_P99: MEMORY_P99,
    TRAINABLE_PARAMS: TRAINABLE_PARAMS, TOTAL_PARAMS: TOTAL_PARAMS,
    TRAINABLE_PCT: TRAINABLE_PCT, MODEL_SIZE: MODEL_SIZE, ADAPTER_SIZE: ADAPTER_SIZE,
    TRAIN_STEPS: TRAIN_STEPS, OTHER_CPU_SHARE: OTHER_CPU_SHARE,
}
INTEGER_KEYS = (TRAINABLE_PARAMS, TOTAL_PARAMS, TRAIN_STEPS)

# Keys only a summary row has: tasks/report.py writes them; the report's tables and charts,
# summary.json's readers and the budget answers read them.
PCT_OF_REF_TIME = "train_time_pct_of_ref"  # training time as a percentage of the reference's
PARETO_OPTIMAL = "pareto_optimal"          # no other method faster and more accurate (or None)
TIMING_WARNINGS = "timing_warnings"        # why its timings are contaminated (also summary.json's)
FAILED_SEEDS = "failed_seeds"
RUN_IDS = "run_ids"
# (The row's "method", "kind", "status", "seeds" and "error" are left as plain words: every
# other table row of the report has them too.)
SUMMARY_KEYS = (*CHILD_METRICS, PCT_OF_REF_TIME, PARETO_OPTIMAL, TIMING_WARNINGS, FAILED_SEEDS,
                RUN_IDS)


def row_ci(key: str) -> str:
    """`row_ci("accuracy")` -> "accuracy_ci": a summary row's [low, high] 95% interval of a
    number in AGGREGATED (None with fewer than two seeds)."""
    return f"{key}_ci"


def row_std(key: str) -> str:
    return f"{key}_std"


# ------------------------------------------------------------------ aggregates (one run a method)
# The numbers the issue asks to aggregate over seeds: mean, std and a 95% Student-t interval.
AGGREGATED = (ACCURACY, F1_MACRO, FINAL_LOSS, TRAIN_TIME, STEP_TIME_MEDIAN, SAMPLES_PER_S,
              TOKENS_PER_S, PEAK_MEMORY, MEMORY_AVG, MEMORY_P99)
STATS = ("mean", "std", "ci_low", "ci_high")
N_SEEDS = "n_seeds"
# Summary keys that cannot be negative and are summarised on the log scale
# (tasks/analysis/stats.py `log_interval`): `_mean` is the geometric mean, `_std` the std of
# ln(value), `_ci_low`/`_ci_high` exp of the t-interval of ln(value), never ≤ 0. Accuracy, F1
# and loss stay linear. Written by tasks/analysis/aggregate.py; read by the report's tables
# and charts and the regression alarm.
LOG_SCALE = (TRAIN_TIME, STEP_TIME_MEDIAN, EVAL_TIME, SAMPLES_PER_S, TOKENS_PER_S,
             EVAL_SAMPLES_PER_S, PEAK_MEMORY, MEMORY_AVG, MEMORY_P99)


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
# On aggregate runs: the summary keys whose `_mean` is a geometric mean, comma-separated.
# Aggregate runs written before geometric means lack it; the regression alarm then recomputes
# that benchmark's means from its child runs (tasks/analysis/regression.py).
GEOMETRIC_MEANS = "peft_bench.geometric_means"
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
# A child run's files: flows/orchestration/outputs.py `log_outputs` writes them (the config through
# tasks/tracking/runs.py `log_config`, which logs the parent run's config too). The paired
# comparison reads the predictions (tasks/analysis/aggregate.py); export and --resume read the
# config (tasks/reporting/export.py, flows/cli/launch.py); a reused run gets copies of all three
# (tasks/tracking/reuse.py).
PREDICTIONS = "predictions.csv"
CONFIG_FILE = "config.yaml"
CONFUSION_MATRIX = "confusion_matrix.png"
ADAPTER_ARTIFACTS = "adapter"  # peft's layout for adapters; every trained tensor for full
REPORT_ARTIFACTS = "report"
# The report's folder, logged on the parent run under REPORT_ARTIFACTS: tasks/report.py writes
# it (ReportResult's paths name the two documents, which flows/benchmark.py and the CLI print).
SUMMARY_JSON = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# The report's charts, one PNG each in that folder: tasks/reporting/charts.py and charts_sweep.py
# draw them (Chart.key is the file name), tasks/reporting/render.py lays them out.
CHART_PARETO = "pareto.png"
CHART_TRAIN_TIME = "train_time.png"
CHART_EVAL_ACCURACY = "eval_accuracy.png"
CHART_TRAIN_LOSS = "train_loss.png"
CHART_MODEL_SIZE = "model_size.png"
CHART_PEAK_MEMORY = "peak_memory.png"
CHART_TRAINABLE_PARAMS = "trainable_params.png"
CHART_SWEEP_SENSITIVITY = "sweep_sensitivity.png"
CHART_SWEEP_PARETO = "sweep_pareto.png"
ARTIFACT_FILES = (PREDICTIONS, CONFIG_FILE, CONFUSION_MATRIX, SUMMARY_JSON, REPORT_MD, REPORT_HTML,
                  CHART_PARETO, CHART_TRAIN_TIME, CHART_EVAL_ACCURACY, CHART_TRAIN_LOSS,
                  CHART_MODEL_SIZE, CHART_PEAK_MEMORY, CHART_TRAINABLE_PARAMS,
                  CHART_SWEEP_SENSITIVITY, CHART_SWEEP_PARETO)
PREFECT_REPORT_KEY = "peft-bench-report"
PREFECT_REGRESSION_KEY = "peft-bench-regressions"
REGRESSION_EVENT = "peft-bench.regression.detected"
PROGRESS_LOGGER = "peft_bench.progress"  # our progress lines, the console's only source
LOG_ARTIFACTS = "logs"                   # the run's full log, on the parent run

# ------------------------------------------------------------------ Prefect artifacts per benchmark
# flows/orchestration/artifacts.py writes a benchmark's results table and its progress bar under
# these prefixes + the benchmark name's slug + a short hash of the name (`artifact_key`), so
# Prefect's Artifacts page shows one history per benchmark across nightly runs.
PREFECT_RESULTS_PREFIX = "peft-bench-results-"
PREFECT_PROGRESS_PREFIX = "peft-bench-progress-"

# ------------------------------------------------------------------ labels (tasks/data/labels.py)
LABEL_NAMES = "peft_bench.label_names"   # on child runs with class names: JSON list, by id

# ------------------------------------------------------------------ the MLflow UI's saved view
# MLflow 3.17's UI keeps a saved chart view as an experiment tag, prefix + the view's id, and
# opens it from the URL parameter below (the format is pinned in tasks/tracking/ui_view.py,
# which writes ours; tasks/tracking/runs.py `ui_path` links to it).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
UI_VIEW_ID = "peft-bench-methods"
SHARE_KEY_PARAM = "viewStateShareKey"

# ------------------------------------------------------------------ sweeps that stop early
# flows/orchestration/trials.py: a halving/tpe grid run is one trial of its method's Optuna
# study. A pruned point's run ends FINISHED, its partial curves kept, tagged with the step it
# was stopped at (flows/orchestration/sweeping.py `choose` reads it: a pruned point is never
# chosen over one that trained to the end).
PRUNED_AT_STEP = "peft_bench.pruned_at_step"
TRIAL = "peft_bench.trial"               # on a grid run: "<study name>#<trial number>"
