"""benchmarks/pipeline_overhead.py --history N: the server really holds N finished runs."""
from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from benchmarks._prefect_history import fill


def test_the_history_is_n_completed_flow_runs_with_their_logs(prefect_harness):
    fill(30)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_="history-")), limit=100)
        assert len(runs) == 30
        assert {r.state.type.value for r in runs} == {"COMPLETED"}
        assert {client.read_flow(r.flow_id).name for r in runs} == {"benchmark", "finetune"}
