"""One rank of a distributed child run: what `torchrun -m flows.rank_main` runs.

The flow process (flows/orchestration/torchrun.py) writes the job (config, method, MLflow run
id, split) to a private folder and starts torchrun; each rank reads it there. On other hosts
(`peft-bench join`) there is no job file: those ranks get the job from the rank that holds it,
over the process group. The holder, the first local rank of the flow's host, owns the MLflow
run: it logs, writes the checkpoints, the adapter and `result.json`, and relays the progress
lines. The others train and log nothing. A rank that fails writes `error-rank<N>.json` (its
rank and error) and exits non-zero; torchrun then stops the others.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from flows.orchestration.job import BACKEND_ENV, JOB_DIR_ENV, JOB_ENV, PROGRESS, RESULT, error_file
from tasks.common import progress
from tasks.common.errors import describe
from tasks.training import distributed
from tasks.training.distributed import Rank


def share_job(job: Optional[dict], holder: bool) -> tuple[dict, bool]:
    """The job on every rank, from the lowest rank that holds it (a collective). Returns the
    job and whether this rank owns the run (exactly one rank does)."""
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, dist.get_rank() if holder else None)
    src = min((r for r in held if r is not None), default=None)
    if src is None:
        raise RuntimeError("no rank of this torchrun job holds the job: start the run with "
                           "`peft-bench run` on one host and `peft-bench join` on the others")
    box = [job]
    dist.broadcast_object_list(box, src=src)
    return box[0], dist.get_rank() == src


def run(job: dict, rank: Rank, job_dir: Path) -> dict[str, float]:
    from flows.finetune import get_method, run_method
    from flows.orchestration.trials import trial_hook
    from tasks.config.schema import BenchConfig
    from tasks.preflight import resolve_device
    from tasks.prepare import prepare_cached

    cfg = BenchConfig.model_validate(job["config"])
    method = get_method(cfg, job["method"])
    device = distributed.rank_device(resolve_device(cfg.training))
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    if rank.owner:
        progress.relay(job_dir / PROGRESS)
    # The first rank of each host tokenises (or reads the cache), then the others read the
    # cache it filled: no two processes write the same entry.
    for turn in (True, False):
        if (rank.local_rank == 0) == turn:
            data, _ = prepare_cached(cfg.data, cfg.model.name_or_path, cfg.model.revision)
        dist.barrier()
    hook = (trial_hook(cfg, job["parent_run_id"], job["point"], job["phase"])
            if rank.owner else None)
    return run_method(cfg, method, data, job["run_id"], device, resumed=job["resumed"],
                      split=job["split"], hook=hook, rank=rank)


def main() -> int:
    job_dir = Path(os.environ[JOB_DIR_ENV])
    local = int(os.environ.get("LOCAL_RANK", 0))
    job_file = os.environ.get(JOB_ENV)
    job = json.loads(Path(job_file).read_text(encoding="utf-8")) if job_file else None
    backend = os.environ.get(BACKEND_ENV, "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    global_rank = dist.get_rank()
    try:
        job, owner = share_job(job, job_file is not None and local == 0)
        rank = Rank(global_rank, dist.get_world_size(), local, job["strategy"], owner)
        result = run(job, rank, job_dir)
        if owner:
            tmp = job_dir / f".{RESULT}.tmp"
            tmp.write_text(json.dumps(result), encoding="utf-8")
            tmp.replace(job_dir / RESULT)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then re-raised
        error_file(job_dir, global_rank).write_text(json.dumps({
            "rank": global_rank, "host": os.uname().nodename,
            "error": describe(e, one_line=True, limit=2000),
            "traceback": traceback.format_exc()[-8000:]}), encoding="utf-8")
        raise
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
