"""The pipeline's stages, one Prefect task module each, in the order a benchmark runs them:

0. `preflight` every check that can run before anything expensive (no Prefect task: the CLI and
               the benchmark flow call it before the stages)
1. `prepare`   read, validate, tokenise and cache the dataset (`prepare_dataset`)
2. `load`      load the base model, optionally 4-bit, and inject the adapter (`load_model_task`,
               `inject_adapter_task`)
3. `train`     our training loop (`train_task`)
4. `evaluate`  metrics, predictions, confusion matrix (`evaluate_task`)
5. `conclude`  per-method aggregates over seeds, then the regression alarm (`conclude_task`)
6. `report`    the report, read back from MLflow (`generate_report_task`)

Their helpers live in sub-packages by concern: `config/` (the typed config and its files),
`data/` (reading, labels, batching), `models/` (where weights come from and
whether a folder is sound), `training/` (checkpoints, memory, machine load), `tracking/` (the one
MLflow layer), `analysis/` (statistics, aggregates, regression), `reporting/` (tables, charts,
templates, exports) and `common/` (the names every writer and reader share, errors, secrets,
progress lines). Nothing here imports `flows`.
"""

import os as _os

# MLflow 3 starts a telemetry client when it is imported: a thread that fetches its settings and
# posts usage records over HTTPS, which on an offline benchmark host only costs CPU (measured
# in the profile of benchmarks/pipeline_overhead.py, issue #21) beside the timed training.
# Off unless the user asked for it (MLFLOW_DISABLE_TELEMETRY=false); set before any `tasks`
# module imports mlflow.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
