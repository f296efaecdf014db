"""The two Prefect flows on top: `benchmark` (the parent: validate, prepare once, one
`finetune` per method and seed, conclude, report) and `finetune` (one method and seed). The
command line is in `cli/`, how the runs are laid out and dispatched in `orchestration/`, and the
servers and processes in `infra/`. `flows` imports `tasks`, never the other way."""

from flows.infra import heartbeats as _heartbeats

# Before any flow runs: Prefect's heartbeat thread is not waited for at each flow's end.
_heartbeats.install()
