"""One run over several processes (training.distributed, issue #19), for real: torchrun, gloo,
2 ranks on this 2-core machine, through the whole pipeline (Prefect flow, MLflow runs).

The oracle: one process at batch 32 over the same rows. How the data order matches: every rank
builds the loader at the global batch (16 × 2 ranks) with the same seed, so it draws the same
global batches as the one process, and keeps its half of each (tasks/training/distributed.py).
The model's dropout is off (every rank draws its own masks); 245 training rows leave a last
batch of 21 that splits 11/10, so the loss weighting is exercised too.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from _procs import MARKER, kill_all, marked
from conftest import ROOT, SESSION, ceiling
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from flows.orchestration.job import JOB_DIR_ENV
from tasks.common import names
from tasks.report import read_children
from tasks.training.distributed import Rank

TOL = 1e-5
LORA = {"name": "lora", "method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0,
        "targets": ["c_attn"]}
FULL = {"name": "full", "method": "full"}
QDORA = {"name": "qdora", "method": "qdora", "rank": 4, "alpha": 8, "dropout": 0.0,
         "targets": ["c_attn"]}  # DoRA on the 4-bit base: both of our other kinds at once
VERA = {"name": "vera", "method": "peft",  # Hugging Face peft's, through method: peft
        "peft": {"peft_type": "VERA", "r": 16, "target_modules": ["c_attn"]}, "lr": 5e-3}
EVERY = [FULL, LORA, QDORA, VERA]


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gpt2-no-dropout") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _config(where: Path, model: Path, sst2: Path, methods: list[dict], batch: int,
            distributed: dict | None = None, **training) -> dict:
    train = {"epochs": 1, "batch_size": batch, "lr": 2e-3, "eval_every": 3, "log_every": 1,
             "device": "cpu", "checkpoint_every": None, "seed": 3, **training}
    if distributed is not None:
        train["distributed"] = distributed
    where.mkdir(parents=True, exist_ok=True)
    return {"name": "dist", "model": {"name_or_path": str(model)},
            "data": {"source": str(sst2), "train_size": 245, "eval_size": 64, "max_length": 32},
            "methods": methods, "training": train,
            "tracking": {"tracking_uri": f"sqlite:///{where}/mlflow.db", "experiment": "dist",
                         "system_metrics": False},
            "report": {"output_dir": str(where / "reports")}, "regression": {"enabled": False}}


def _children(cfg: dict, parent: str) -> dict[str, object]:
    return {r.data.tags[names.METHOD]: r
            for r in read_children(cfg["tracking"]["tracking_uri"], parent)}


def _losses(cfg: dict, run) -> dict[int, float]:
    hist = MlflowClient(cfg["tracking"]["tracking_uri"]).get_metric_history(run.info.run_id,
                                                                            names.TRAIN_LOSS)
    by_step = {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}  # a resume
    return by_step  # a resume logs some steps twice: the last counts


def _evals(cfg: dict, run) -> list[tuple[int, float]]:
    hist = MlflowClient(cfg["tracking"]["tracking_uri"]).get_metric_history(run.info.run_id,
                                                                            names.EVAL_LOSS)
    return sorted({m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}.items())


def _run(cfg: dict) -> tuple[dict, dict]:
    result = benchmark(config=cfg)
    return cfg, _children(cfg, result["parent_run_id"])


@pytest.fixture(scope="module")
def one_process(prefect_harness, no_dropout_model, sst2_dir, tmp_path_factory):
    return _run(_config(tmp_path_factory.mktemp("one"), no_dropout_model, sst2_dir,
                        EVERY, batch=32))


@pytest.fixture(scope="module")
def ddp(prefect_harness, no_dropout_model, sst2_dir, tmp_path_factory):
    return _run(_config(tmp_path_factory.mktemp("ddp"), no_dropout_model, sst2_dir,
                        EVERY, batch=16, distributed={"nproc_per_node": 2}))


def _assert_same(ref: tuple, other: tuple, method: str, from_step: int = 1) -> None:
    """Per-step losses, periodic and final evaluations, steps and parameters equal; a resumed
    run's history holds the steps from its checkpoint on (the killed process's unflushed
    metrics died with it)."""
    (rc, rruns), (oc, oruns) = ref, other
    r, o = rruns[method], oruns[method]
    assert o.info.status == "FINISHED"
    ref_losses, losses = _losses(rc, r), _losses(oc, o)
    assert sorted(ref_losses) == list(range(1, 9))  # ceil(245 / 32) steps
    assert set(range(from_step, 9)) <= set(losses) <= set(ref_losses)
    diff = max(abs(v - ref_losses[k]) for k, v in losses.items())
    assert diff < TOL, (losses, ref_losses)
    ref_ev, ev = _evals(rc, r), _evals(oc, o)
    assert ref_ev[-1][0] == ev[-1][0] == 8
    ev = [(k, v) for k, v in ev if k >= from_step]
    ref_ev = [(k, v) for k, v in ref_ev if k >= from_step]
    assert [k for k, _ in ev] == [k for k, _ in ref_ev] and len(ev) >= 1
    assert max(abs(a - b) for (_, a), (_, b) in zip(ev, ref_ev)) < TOL, (ev, ref_ev)
    for key in (names.EVAL_ACCURACY, names.EVAL_F1, names.TRAIN_STEPS, names.TRAINABLE_PARAMS):
        assert math.isclose(o.data.metrics[key], r.data.metrics[key], abs_tol=TOL), key


def test_a_rank_keeps_its_rows_of_each_global_batch():
    batch = {"input_ids": torch.arange(21).unsqueeze(1), "labels": torch.arange(21)}
    parts = [Rank(r, 2, r, "ddp", r == 0).shard(batch) for r in (0, 1)]
    assert [p["labels"].tolist() for p, _ in parts] == [list(range(11)), list(range(11, 21))]
    # weight × the rank's mean = its share of the global sum, times the world size
    assert [w for _, w in parts] == [11 * 2 / 21, 10 * 2 / 21]
    lone, weight = Rank(1, 2, 1, "ddp", False).shard({k: v[:1] for k, v in batch.items()})
    assert weight == 0.0 and len(lone["labels"]) == 1  # takes part, adds nothing


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", [m["name"] for m in EVERY])
def test_ddp_two_ranks_equal_one_process_at_the_global_batch(one_process, ddp, method):
    _assert_same(one_process, ddp, method)
    run = ddp[1][method]
    assert run.data.params[names.WORLD_SIZE] == "2"
    assert run.data.params[names.DIST_STRATEGY] == "ddp"
    per_rank = [run.data.metrics[names.rank_metric(names.PEAK_MEMORY, r)] for r in (0, 1)]
    assert run.data.metrics[names.PEAK_MEMORY] == max(per_rank) > 0
    # the whole job's samples: every row of the epoch once
    steps_s = run.data.metrics[names.TRAIN_TIME]
    assert math.isclose(run.data.metrics[names.SAMPLES_PER_S] * steps_s, 245, rel_tol=1e-6)
    artifacts = {a.path for a in MlflowClient(ddp[0]["tracking"]["tracking_uri"])
                 .list_artifacts(run.info.run_id, names.ADAPTER_ARTIFACTS)}
    assert artifacts, "the owner logged the weights"


@pytest.mark.timeout(900)
def test_fsdp_full_fine_tuning_equals_one_process(one_process, prefect_harness,
                                                  no_dropout_model, sst2_dir, tmp_path):
    fsdp = _run(_config(tmp_path, no_dropout_model, sst2_dir, [FULL], batch=16,
                        distributed={"nproc_per_node": 2, "strategy": "fsdp"}))
    _assert_same(one_process, fsdp, "full")
    assert fsdp[1]["full"].data.params[names.DIST_STRATEGY] == "fsdp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "peft-bench"), *args]


@pytest.mark.timeout(900)
def test_two_hosts_on_one_host_equal_one_process(one_process, prefect_harness, no_dropout_model,
                                                 sst2_dir, tmp_path):
    """nnodes 2: this process's flow is one "host", a `peft-bench join` the other, one rank
    each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{_free_port()}"
    dist = {"nnodes": 2, "nproc_per_node": 1, "rdzv_endpoint": endpoint, "rdzv_id": "two-hosts",
            "join_timeout_s": ceiling(300)}
    cfg = _config(tmp_path, no_dropout_model, sst2_dir, [LORA], batch=16, distributed=dist)
    other = subprocess.Popen(_cli("join", "--rdzv-endpoint", endpoint, "--nnodes", "2",
                                  "--rdzv-id", "two-hosts", "--join-timeout-s",
                                  str(int(ceiling(300)))),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result = _run(cfg)
        out, _ = other.communicate(timeout=ceiling(120))
    finally:
        if other.poll() is None:
            kill_all([psutil.Process(other.pid)])
            other.communicate()
    assert other.returncode == 0, out[-3000:]
    _assert_same(one_process, result, "lora")
    assert result[1]["lora"].data.params[names.WORLD_SIZE] == "2"


# ------------------------------------------------------------------ faults
def _ranks(local_rank: str | None = None) -> list[psutil.Process]:
    """This session's rank processes (they carry the job folder in their environment)."""
    found = []
    for p in marked(SESSION):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if JOB_DIR_ENV in env and "LOCAL_RANK" in env and (
                local_rank is None or env["LOCAL_RANK"] == local_rank):
            found.append((p, Path(env[JOB_DIR_ENV])))
    return found


def _training_rank(local_rank: str, proc: subprocess.Popen) -> psutil.Process:
    """Wait for the event: the owner has relayed a finished optimiser step."""
    deadline = time.monotonic() + ceiling(300)
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended first: " + proc.stdout.read()[-3000:]
        for p, job_dir in _ranks(local_rank):
            relay = job_dir / "progress.log"
            if relay.exists() and any(line.startswith("S ") for line in relay.read_text().splitlines()):
                return p
        time.sleep(0.3)
    raise AssertionError("no rank started training")


def _start_cli(tmp_path: Path, cfg: dict) -> subprocess.Popen:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PEFT_BENCH_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **{MARKER: SESSION})
    return subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=ceiling(180))
    finally:
        if proc.poll() is None:
            kill_all([psutil.Process(proc.pid)])
            out, _ = proc.communicate()
    return out


def _runs(cfg: dict) -> dict[str, object]:
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name("dist")
    return {r.data.tags.get(names.METHOD, "parent"): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(names.ROLE) in (names.ROLE_PARENT, names.ROLE_CHILD)}


def _no_rank_left() -> bool:
    deadline = time.monotonic() + ceiling(60)
    while _ranks() and time.monotonic() < deadline:
        time.sleep(0.3)
    return not _ranks()


@pytest.mark.timeout(900)
def test_a_killed_rank_fails_the_run_naming_it_and_leaves_nothing_behind(
        no_dropout_model, sst2_dir, tmp_path):
    cfg = _config(tmp_path, no_dropout_model, sst2_dir, [LORA], batch=16,
                  distributed={"nproc_per_node": 2}, max_steps=100000)
    proc = _start_cli(tmp_path, cfg)
    _training_rank("1", proc).kill()
    out = _finish(proc)
    assert proc.returncode != 0, out[-3000:]
    runs = _runs(cfg)
    assert {r.info.status for r in runs.values()} == {"FAILED"}
    error = runs["lora"].data.tags[names.ERROR]
    assert "rank 1 failed" in error and "SIGKILL" in error, error
    assert _no_rank_left()


@pytest.mark.timeout(900)
def test_sigterm_to_the_flow_reaches_every_rank(no_dropout_model, sst2_dir, tmp_path):
    cfg = _config(tmp_path, no_dropout_model, sst2_dir, [LORA], batch=16,
                  distributed={"nproc_per_node": 2}, max_steps=100000)
    proc = _start_cli(tmp_path, cfg)
    _training_rank("0", proc)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 143, out[-3000:]
    assert _no_rank_left()
    runs = _runs(cfg)
    assert runs["lora"].info.status == "FAILED"
    assert "terminated by SIGTERM" in runs["lora"].data.tags[names.ERROR]


@pytest.mark.timeout(900)
def test_resume_continues_a_distributed_run_to_the_uninterrupted_result(
        ddp, no_dropout_model, sst2_dir, tmp_path):
    """Killed with SIGKILL after a checkpoint (torchrun dies with it), then `--resume`: the
    LoRA run ends as the uninterrupted DDP run did."""
    cfg = _config(tmp_path, no_dropout_model, sst2_dir, [LORA], batch=16,
                  distributed={"nproc_per_node": 2}, checkpoint_every=2,
                  checkpoint_dir=str(tmp_path / "ckpt"))
    proc = _start_cli(tmp_path, cfg)
    deadline = time.monotonic() + ceiling(300)
    while not list((tmp_path / "ckpt").glob("*/step-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.kill()
    _finish(proc)
    assert _no_rank_left()
    parent = _runs(cfg)["parent"].info.run_id
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PEFT_BENCH_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(_cli("run", "--resume", parent, "--set",
                              f"tracking.tracking_uri={cfg['tracking']['tracking_uri']}",
                              "--set", "tracking.experiment=dist"),
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=ceiling(600))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = _runs(cfg)
    assert runs["lora"].info.status == "FINISHED"
    assert names.RESUMED in runs["lora"].data.tags
    resumed = int(runs["lora"].data.tags[names.RESUMED])
    _assert_same(ddp, (cfg, runs), "lora", from_step=resumed + 1)
