"""A child run under torchrun: the flow process starts `python -m torch.distributed.run` as a
subprocess, follows its progress and maps its exit to the run's state.

The pattern of Metaflow's @torchrun and Flyte's Elastic task: the orchestrator's task owns the
MLflow run; torchrun owns the ranks (flows/rank_main.py). Each rank's stdout and
stderr go to files in the job's folder (torchrun --redirects), so the console shows our lines
only. The launcher keeps no process behind: torchrun dies with this process (PDEATHSIG), and
on an interrupt (Ctrl-C, SIGTERM) it is sent SIGTERM, which torchrun forwards to every rank,
then SIGKILL for the whole group after a grace period.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from flows.orchestration.job import BACKEND_ENV, JOB_DIR_ENV, JOB_ENV, PROGRESS, RESULT
from tasks.common import progress
from tasks.config.distributed import DistributedConfig, check_distributed
from tasks.config.schema import BenchConfig
from tasks.training.distributed import backend

GRACE_S = 30.0  # between SIGTERM to torchrun and SIGKILL to its group
POLL_S = 0.5


class RankFailed(RuntimeError):
    """A rank of a distributed run failed: the message names the rank and its error."""


def torchrun_command(d: DistributedConfig, job_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
           str(d.nproc_per_node), "--nnodes", str(d.nnodes), "--max-restarts", "0",
           "--log-dir", str(job_dir / "logs"), "--redirects", "3"]
    if d.nnodes == 1:
        cmd.append("--standalone")  # a free local port: runs side by side do not collide
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", d.rdzv_endpoint,
                "--rdzv-id", d.rdzv_id, "--rdzv-conf", f"join_timeout={int(d.join_timeout_s)}"]
    return cmd + ["-m", "flows.rank_main"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the flow process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(d: DistributedConfig, job_dir: Path, device: str,
          job_file: Optional[Path]) -> subprocess.Popen:
    env = {**os.environ, JOB_DIR_ENV: str(job_dir), BACKEND_ENV: backend(d.backend, device)}
    if job_file is not None:
        env[JOB_ENV] = str(job_file)
    log = open(job_dir / "torchrun.log", "wb")
    return subprocess.Popen(torchrun_command(d, job_dir), env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)


def wait(proc: subprocess.Popen, follower: Optional[progress.Follower]) -> int:
    """Follow the progress until torchrun exits; on any interrupt stop it and every rank."""
    try:
        while proc.poll() is None:
            if follower is not None:
                follower.poll()
            time.sleep(POLL_S)
        return proc.returncode
    except BaseException:
        stop(proc)
        raise
    finally:
        if follower is not None:
            follower.poll()
            follower.close()


def stop(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # torchrun's agent forwards it to every rank
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session
    proc.wait()


def failure(job_dir: Path, code: int) -> RankFailed:
    """Which rank failed and why. A rank killed by a signal (other than the SIGTERM torchrun
    sends the survivors) caused it: it could write nothing, and the others then fail in their
    next collective. Else the first error a rank wrote; else torchrun's own last lines."""
    log = (job_dir / "torchrun.log").read_text(encoding="utf-8", errors="replace")
    exits = {int(r): int(c) for r, c in EXIT_LINE.findall(log)}
    errors = sorted(job_dir.glob("error-rank*.json"), key=os.path.getmtime)
    killed = sorted(r for r, c in exits.items() if c < 0 and -c != signal.SIGTERM)
    if killed:
        rank = killed[0]
        msg = (f"rank {rank} failed: killed by {signal.Signals(-exits[rank]).name} (exit code "
               f"{exits[rank]})")
        return RankFailed(msg + (f"; then {_first(errors)}" if errors else ""))
    if errors:
        return RankFailed(f"{_first(errors)}")
    if exits:
        rank, c = min(exits.items())
        return RankFailed(f"rank {rank} failed: exit code {c}")
    tail = " | ".join(log.strip().splitlines()[-5:])
    return RankFailed(f"torchrun exited with code {code} before any rank reported: {tail}")


EXIT_LINE = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def _first(errors: list[Path]) -> str:
    e = json.loads(errors[0].read_text())
    return f"rank {e['rank']} failed ({e['host']}): {e['error']}"


def run_job(cfg: BenchConfig, method_name: str, run_id: str, parent_run_id: str, device: str,
            resumed: bool, split: str, point: dict, phase: str) -> dict[str, float]:
    """Run one child run's training and evaluation under torchrun; its metrics."""
    d = cfg.training.distributed
    check_distributed(d, cfg.methods, cfg.training, device)
    with tempfile.TemporaryDirectory(prefix="peft-bench-job-") as tmp:
        job_dir = Path(tmp)
        job = {"config": cfg.model_dump(mode="json"), "method": method_name, "run_id": run_id,
               "parent_run_id": parent_run_id, "resumed": resumed, "split": split,
               "point": point, "phase": phase, "strategy": d.strategy}
        job_file = job_dir / "job.json"  # the folder is the user's alone (mkdtemp: 0700)
        job_file.write_text(json.dumps(job), encoding="utf-8")
        progress.say(f"  torchrun: {d.world_size} ranks ({d.nnodes} host(s) × "
                     f"{d.nproc_per_node}), {d.strategy}, {backend(d.backend, device)}")
        proc = start(d, job_dir, device, job_file)
        code = wait(proc, progress.Follower(job_dir / PROGRESS))
        if code != 0 or not (job_dir / RESULT).exists():
            raise failure(job_dir, code)
        return json.loads((job_dir / RESULT).read_text(encoding="utf-8"))
