"""The rows of issue #16 in benchmarks/faults.py's table: awkward names and inputs, unknown
run ids, a user's folder, SIGTERM, and an MLflow server that goes away mid-run."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml

from benchmarks.faults import CLI, ROOT, Row, message_of, run_cli, runs_by_status, write_data
from tasks.common import names

NAME = 'o\'brien\'s "nightly"'


def data_cases(root: Path) -> list[tuple[str, list[str], dict]]:
    """More rows for faults.simple_cases: labels as words, long fields."""
    good = "sentence\tlabel\nfine\t1\nbad\t0\nok\t1\n"
    small = ["data.train_size=null", "data.eval_size=null"]
    names = write_data(root / "names", "sentence\tlabel\nfine\tpositive\nbad\tnegative\n"
                       "ok\tpositive\n", "sentence\tlabel\nfine\tpositive\nbad\tnegative\n")
    mixed = write_data(root / "mixed", "sentence\tlabel\nfine\t1\nbad\tnegative\n", good)
    unseen = write_data(root / "unseen", "sentence\tlabel\nfine\tpositive\nbad\tnegative\n",
                        "sentence\tlabel\nfine\tpositive\nmeh\tneutral\n")
    long = write_data(root / "long", "sentence\tlabel\n" + "word " * 40_000 + "\t1\nbad\t0\n"
                      "ok\t1\n", good)
    return [("data: class-name labels (runs)", [f"data.source={names}", *small], {}),
            ("data: labels mixing ids and names", [f"data.source={mixed}", *small], {}),
            ("data: eval class name not in training", [f"data.source={unseen}", *small], {}),
            ("data: a 200,000-character sentence (runs)", [f"data.source={long}", *small], {}),
            ("config: a control character in the name", ["name='tab\there'"], {})]


def _work(root: Path, name: str, cfg: dict) -> tuple[Path, dict, dict]:
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = json.loads(json.dumps(cfg).replace("@WORK@", str(work)))
    (work / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    env: dict = {}  # run_cli adds the cache folder and offline flags; _env does for Popen
    return work, cfg, env


def quoted_name_and_ids(root: Path, cfg: dict) -> list[Row]:
    """A benchmark named with both quote kinds, run twice (the second finds the first as its
    regression baseline); then unknown ids and a user's folder on the commands that take them."""
    work, cfg, env = _work(root, "quoted", {**cfg, "name": NAME})
    rows, uri = [], cfg["tracking"]["tracking_uri"]
    for i in range(2):
        code, secs, out = run_cli(["run", str(work / "c.yaml")], work, env)
        rows.append(Row(f"name {NAME}, run {i + 1}", code, secs,
                        message_of(out) if code else "finished", runs_by_status(work), 0,
                        "Traceback" in out))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    child = next(r.info.run_id for r in runs if r.data.tags.get(names.METHOD) == "lora"
                 and r.data.tags.get(names.ROLE) == names.ROLE_CHILD)
    unknown, t = "0123456789abcdef0123456789abcdef", ["--tracking-uri", uri]
    for label, args in (("report", ["report", unknown, *t]),
                        ("export", ["export", unknown, str(work / "e"), *t]),
                        ("promote", ["promote", unknown, "--name", "m", *t]),
                        ("compare --parent", ["compare", "--parent", unknown, *t]),
                        ("run --resume", ["run", "--resume", unknown,
                                          "--set", f"tracking.tracking_uri={uri}"]),
                        ("report, malformed id", ["report", "../etc", *t])):
        code, secs, out = run_cli(args, work, env)
        rows.append(Row(f"unknown run id: {label}", code, secs, message_of(out),
                        runs_by_status(work), 0, "Traceback" in out))
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for label, extra in (("export into a folder with a user's file", []),
                         ("... with --force", ["--force"])):
        code, secs, out = run_cli(["export", child, str(mine), *extra, *t], work, env)
        kept = (mine / "notes.txt").read_text() == "mine"
        rows.append(Row(f"{label} (user's file kept: {'yes' if kept else 'NO'})", code, secs,
                        message_of(out) if code else "adapter written", runs_by_status(work), 0,
                        "Traceback" in out))
    return rows


def _until(predicate, proc: subprocess.Popen, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)


def sigterm(root: Path, cfg: dict) -> Row:
    """SIGTERM once LoRA has a checkpoint: exit 143, runs FAILED with the reason."""
    work, cfg, env = _work(root, "sigterm", cfg)
    cfg["methods"] = cfg["methods"][1:]
    cfg["training"].update(max_steps=100000, checkpoint_every=10, checkpoint_dir=str(work / "ck"))
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.Popen([CLI, "run", str(work / "c.yaml")], cwd=ROOT, env=_env(env, work),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _until(lambda: bool(list((work / "ck").glob("*/latest"))), proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    return Row("SIGTERM mid-training", proc.returncode, time.perf_counter() - t0,
               message_of(out), runs_by_status(work), 0, "Traceback" in out)


def _env(extra: dict, work: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, **extra, "PEFT_BENCH_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}


def server_outage(root: Path, cfg: dict) -> list[Row]:
    """A real `mlflow server`: stopped 20 s mid-training then restarted (the run finishes);
    stopped for good (exit 4, in bounded time), then `close-stale` once it is back."""
    from mlflow.tracking import MlflowClient

    from flows.infra import stack

    rows = []
    for label, comes_back in (("MLflow server away 20 s mid-training", True),
                              ("MLflow server gone for good mid-training", False)):
        work, cfg2, env = _work(root, "outage" if comes_back else "gone", cfg)
        server = stack.start_mlflow_server(work / "stack", port=0)
        servers = [server]
        try:
            cfg2["methods"] = cfg2["methods"][1:]
            cfg2["training"].update(max_steps=1500 if comes_back else 100000, log_every=1)
            cfg2["tracking"]["tracking_uri"] = server.url
            (work / "c.yaml").write_text(yaml.safe_dump(cfg2))
            proc = subprocess.Popen([CLI, "run", str(work / "c.yaml")], cwd=ROOT,
                                    env=_env(env, work), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            _until(lambda: _has_loss(server.url), proc)
            stack.stop_procs([server])
            t0 = time.perf_counter()
            if comes_back:
                time.sleep(20)
                servers.append(stack.start_mlflow_server(work / "stack", port=server.port))
            out, _ = proc.communicate(timeout=900)
            secs = time.perf_counter() - t0
            if not comes_back:
                servers.append(stack.start_mlflow_server(work / "stack", port=server.port))
                subprocess.run([CLI, "close-stale", "--tracking-uri", server.url,
                                "--experiment", "faults"], cwd=ROOT, env=_env(env, work),
                               capture_output=True, timeout=600)
            after = "" if comes_back else " (after close-stale, the server back)"
            rows.append(Row(f"{label} (s: from the stop to the exit)", proc.returncode, secs,
                            message_of(out) if proc.returncode else "finished",
                            _by_status(MlflowClient(server.url)) + after, 0, "Traceback" in out))
        finally:
            stack.stop_procs(servers)
    return rows


def _has_loss(url: str) -> bool:
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(url).get_experiment_by_name("faults")
    return exp is not None and any(names.TRAIN_LOSS in r.data.metrics for r in
                                   MlflowClient(url).search_runs([exp.experiment_id]))


def _by_status(client) -> str:
    exp = client.get_experiment_by_name("faults")
    counts: dict[str, int] = {}
    for r in client.search_runs([exp.experiment_id]) if exp else []:
        counts[r.info.status] = counts.get(r.info.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
