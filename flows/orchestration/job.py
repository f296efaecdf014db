"""What the launcher (torchrun.py) and the ranks (rank_main.py) of a distributed run share:
the environment variables and the files of the job's folder. Declared once, here."""
from __future__ import annotations

from pathlib import Path

JOB_ENV = "PEFT_BENCH_JOB"          # the job file, on the host that started the run only
JOB_DIR_ENV = "PEFT_BENCH_JOB_DIR"  # where ranks write results, errors and progress
BACKEND_ENV = "PEFT_BENCH_DIST_BACKEND"
RESULT, PROGRESS = "result.json", "progress.log"  # the owner's metrics; its relayed progress


def error_file(job_dir: Path, rank: int) -> Path:
    """A failed rank's report: its rank, host, error and traceback."""
    return job_dir / f"error-rank{rank}.json"
