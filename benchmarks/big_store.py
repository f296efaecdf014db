"""A year of nightly runs: the commands that read MLflow, timed on a store of 5,000+ runs.

    python benchmarks/big_store.py [--runs 5000] [--stale 1500] [--data ../shared/data/sst2]

It builds a tiny model, runs a small real benchmark twice (so the second has a regression
history), times `compare`, `report`, `plan`, `close-stale` and the regression history on that
small store, then adds filler runs through the MLflow client (other benchmarks' parents with
their children and aggregates, FAILED nightlies of the same benchmark, and `--stale` RUNNING
runs whose owner process is gone, all newer than the real ones) and times the same commands
again. It prints both timings and whether each answer stayed the same. Goal: seconds, not
minutes (issue #16). The filler is also what tests/test_scale.py builds its store from.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlflow.tracking import MlflowClient  # noqa: E402

from tasks.common import names  # noqa: E402


def dead_owner() -> str:
    """An owner tag of a process that has exited on this host (what a kill -9 leaves)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{time.time() - 3600:.2f}"


def fill(client: MlflowClient, experiment_id: str, runs: int = 5000, stale: int = 1500,
         benchmark: str = "nightly", config_hash: str = "") -> dict[str, list[str]]:
    """Add about `runs` runs (at least `stale` of them stale RUNNING ones), each created at a
    start time after every existing run. Returns the ids by kind."""
    made: dict[str, list[str]] = {"stale": [], "other": [], "failed_nightly": []}
    t0 = int(time.time() * 1000) + 60_000
    owner = dead_owner()
    for i in range(stale):  # what killed processes left behind, past the first 1,000
        made["stale"].append(client.create_run(
            experiment_id, start_time=t0 + i, run_name=f"stale-{i}",
            tags={names.ROLE: names.ROLE_CHILD, names.OWNER: owner,
                  names.PARENT: f"gone{i:028d}", names.METHOD: "lora"}).info.run_id)
    t = t0 + stale
    while sum(map(len, made.values())) < runs:
        n = len(made["other"]) + len(made["failed_nightly"])
        if n % 50 == 0:  # now and then a nightly of the same benchmark that failed
            rid = client.create_run(experiment_id, start_time=t, run_name=benchmark, tags={
                names.ROLE: names.ROLE_PARENT, names.BENCHMARK: benchmark,
                names.CONFIG_HASH: config_hash}).info.run_id
            client.set_terminated(rid, "FAILED", end_time=t + 1)
            made["failed_nightly"].append(rid)
            t += 1
            continue
        t = _other_benchmark(client, experiment_id, t, n, made["other"])
    return made


def _other_benchmark(client: MlflowClient, experiment_id: str, t: int, n: int,
                     out: list[str]) -> int:
    """One finished benchmark of another name: a parent, 4 children, 2 aggregates."""
    bench = f"other-{n % 97}"
    parent = client.create_run(experiment_id, start_time=t, run_name=bench, tags={
        names.ROLE: names.ROLE_PARENT, names.BENCHMARK: bench,
        names.CONFIG_HASH: f"h{n % 97}", names.DATA_DIGEST: f"d{n % 97}"}).info.run_id
    ids = [parent]
    for k in range(4):
        ids.append(client.create_run(experiment_id, start_time=t + 1 + k, tags={
            names.ROLE: names.ROLE_CHILD, names.PARENT: parent, names.METHOD: "lora",
            names.SEED: str(k)}).info.run_id)
    for k, method in enumerate(("full", "lora")):
        ids.append(client.create_run(experiment_id, start_time=t + 5 + k, tags={
            names.ROLE: names.ROLE_AGGREGATE, names.BENCHMARK_RUN: parent,
            names.METHOD: method}).info.run_id)
    for rid in ids:
        client.set_terminated(rid, "FINISHED", end_time=t + 10)
    out.extend(ids)
    return t + 10


# ---------------------------------------------------------------- the timing script

CLI = str(Path(sys.executable).parent / "peft-bench")


def timed(args: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=1800)
    secs = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return secs, out.stdout


def commands(work: Path, parent: str, uri: str) -> dict[str, list[str]]:
    common = ["--tracking-uri", uri]
    return {"compare --parent P": ["compare", "--parent", parent, *common, "--experiment", "big"],
            "report P": ["report", parent, "--out", str(work / "rebuilt"), *common],
            "plan": ["plan", str(work / "bench.yaml")],
            "close-stale": ["close-stale", *common, "--experiment", "big"]}


def measure(work: Path, parent: str, uri: str, env: dict) -> dict[str, tuple[float, str]]:
    out = {name: timed(args, env, work) for name, args in commands(work, parent, uri).items()}
    from tasks.analysis import regression

    client = MlflowClient(uri)
    t0 = time.perf_counter()
    earlier = regression.history(client, client.get_run(parent), window=5)
    out["history"] = (time.perf_counter() - t0, ",".join(r.info.run_id for r in earlier))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--stale", type=int, default=1500)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/sst2"))
    ap.add_argument("--work", default="/tmp/peft-bench-big-store")
    a = ap.parse_args()
    import shutil

    import yaml

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "PEFT_BENCH_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "big"}
    timed(["make-tiny-model", str(work / "model"), "--data", a.data, "--n-layer", "1",
           "--n-embd", "32"], env, work)
    cfg = {"name": "nightly", "model": {"name_or_path": str(work / "model")},
           "data": {"source": a.data, "train_size": 64, "eval_size": 32, "max_length": 32},
           "methods": [{"name": "full", "method": "full"},
                       {"name": "lora", "method": "lora", "rank": 4, "targets": ["c_attn"]}],
           "training": {"max_steps": 2, "batch_size": 16, "device": "cpu", "eval_every": None},
           "tracking": {"tracking_uri": uri, "experiment": "big"},
           "report": {"output_dir": str(work / "reports")}}
    (work / "bench.yaml").write_text(yaml.safe_dump(cfg))
    for _ in range(2):
        timed(["run", str(work / "bench.yaml")], env, work)
    client = MlflowClient(uri)
    eid = client.get_experiment_by_name("big").experiment_id
    from tasks.tracking import store

    parent = store.parents(client, eid, benchmark="nightly")[0]
    small = measure(work, parent.info.run_id, uri, env)
    before = len(client.search_runs([eid], max_results=50000))
    t0 = time.perf_counter()
    made = fill(client, eid, a.runs, a.stale, "nightly", parent.data.tags[names.CONFIG_HASH])
    built = time.perf_counter() - t0
    total = len(client.search_runs([eid], max_results=50000))
    big = measure(work, parent.info.run_id, uri, env)
    print(f"store: {total:,} runs ({len(made['stale']):,} stale RUNNING), filler built in "
          f"{built:.0f} s through the MLflow client\n")
    print(f"| command | {before} runs | {total:,} runs | same answer |\n|---|---|---|---|")
    for name in small:
        same = _same(name, small[name][1], big[name][1], len(made["stale"]))
        what = "`regression.history` (in process)" if name == "history" else f"`peft-bench {name}`"
        print(f"| {what} | "
              f"{small[name][0]:.2f} s | {big[name][0]:.2f} s | {same} |")
    again = timed(commands(work, parent.info.run_id, uri)["close-stale"], env, work)
    print(f"| `peft-bench close-stale` again (nothing stale) | | {again[0]:.1f} s | |")


def _same(name: str, small: str, big: str, stale: int) -> str:
    if name == "close-stale":
        return "yes" if f"{stale} stale run(s) closed" in big else f"NO: {big.splitlines()[-1]}"
    strip = lambda text: [ln for ln in text.splitlines() if "rebuilt" not in ln]  # noqa: E731
    return "yes" if strip(small) == strip(big) else "NO"


if __name__ == "__main__":
    main()
