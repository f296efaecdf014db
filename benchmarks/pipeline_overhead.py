"""Pipeline overhead: the benchmark flow's wall time minus the methods' own train + eval time.

    python benchmarks/pipeline_overhead.py [--config configs/quickstart.yaml]

A Prefect server is started first (as in production; its ~20 s start-up is not the flow's
cost) and the flow runs in a child process against it. What remains after subtracting every
method's train_time_s, periodic and final eval time, read back from MLflow, is what the
pipeline adds: Prefect bookkeeping, data preparation, model loading, checkpoints written to
measure sizes, MLflow logging and the report.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Twice in one process: the first run prepares (tokenises) the data, the second finds it in
# Prefect's cache, as every later benchmark on the same data does.
RUN = """
import json, sys, time
from flows.benchmark import benchmark
for run in ("cold", "warm"):
    t0 = time.perf_counter()
    out = benchmark(config_path=sys.argv[1], overrides=sys.argv[2:])
    out["wall_s"], out["run"] = time.perf_counter() - t0, run
    print("RESULT " + json.dumps(out))
"""


def run_flow(api_url: str, config: str, overrides: list[str], env_base: dict) -> list[dict]:
    env = {**env_base, "PREFECT_API_URL": api_url, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", RUN, config, *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"flow failed:\n{out.stderr[-4000:]}")
    return [json.loads(ln[len("RESULT "):]) for ln in lines]


def method_seconds(tracking_uri: str, parent: str) -> dict[str, dict[str, float]]:
    from tasks.report import child_runs
    keys = ("train_time_s", "periodic_eval_time_s", "eval_time_s")
    return {r.data.tags["peft_bench.method"]: {k: r.data.metrics.get(k, 0.0) for k in keys}
            for r in child_runs(tracking_uri, parent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from flows.stack import prefect_env, start_prefect_server, stop_procs
    with tempfile.TemporaryDirectory() as tmp:
        server = start_prefect_server(Path(tmp), port=0, ui=False)
        try:
            uri = f"sqlite:///{tmp}/mlflow.db"
            results = run_flow(server.url + "/api", args.config,
                               [f"tracking.tracking_uri={uri}", f"report.output_dir={tmp}/reports",
                                *args.overrides], prefect_env(Path(tmp)))
            report = [(res, method_seconds(uri, res["parent_run_id"])) for res in results]
        finally:
            stop_procs([server])
    for res, per in report:
        work = sum(sum(v.values()) for v in per.values())
        print(f"\n{res['run']} run (data {'prepared' if res['run'] == 'cold' else 'cached'}):")
        for name, v in per.items():
            print(f"  {name:8s} train {v['train_time_s']:7.2f} s  eval "
                  f"{v['periodic_eval_time_s']:6.2f} + {v['eval_time_s']:5.2f} s")
        print(f"  flow wall time        {res['wall_s']:8.2f} s")
        print(f"  methods train + eval  {work:8.2f} s")
        print(f"  pipeline overhead     {res['wall_s'] - work:8.2f} s   (target <= 10 s)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
