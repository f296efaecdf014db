"""A Prefect server with a long history: N finished flow runs, as a nightly deployment's server
keeps after months (issue #21: does the overhead grow with Prefect's database?).

The rows are written with the server's own models into its database (through its API they
would take tens of minutes for 10,000 runs on two cores): one flow run per row, under the flow
names ours use, each with its Completed state and three log lines. Queries of ours or
Prefect's that scan flow runs, states or logs then pay what they would pay in production.
Run it with PREFECT_HOME set to the server's, while the server runs (SQLite WAL).
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from prefect.server import models, schemas
from prefect.server.database import provide_database_interface

FLOWS = ("benchmark", "finetune")
BATCH = 500


async def _fill(n: int) -> None:
    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        flows = [await models.flows.create_flow(session=session, flow=schemas.core.Flow(name=f))
                 for f in FLOWS]
    for start in range(0, n, BATCH):
        async with db.session_context(begin_transaction=True) as session:
            logs = []
            for i in range(start, min(n, start + BATCH)):
                run = await models.flow_runs.create_flow_run(
                    session=session, flow_run=schemas.core.FlowRun(
                        flow_id=flows[i % 2].id, name=f"history-{i}",
                        state=schemas.states.Completed()))
                logs += [schemas.actions.LogCreate(
                    name="benchmarks.history", level=20, message=f"history run {i}: line {k}",
                    timestamp=datetime.now(timezone.utc), flow_run_id=run.id) for k in range(3)]
            await models.logs.create_logs(session=session, logs=logs)


def fill(n: int) -> None:
    """N finished flow runs in the database of the server PREFECT_HOME belongs to."""
    asyncio.run(_fill(n))
