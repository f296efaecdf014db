"""The two Prefect flows on top: `benchmark` (the parent: validate, prepare once, one
`finetune` per method and seed, conclude, report) and `finetune` (one method and seed). The
command line is in `cli/`, how the runs are laid out and dispatched in `orchestration/`, and the
servers and processes in `infra/`. `flows` imports `tasks`, never the other way."""
