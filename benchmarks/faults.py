"""The fault suite: every fault of issues #8 and #16 and the input errors that already worked,
each run through the real CLI in a subprocess, in one table:

    fault | exit | seconds to the error | message (first line) | MLflow runs left by status |
    partial reports | traceback shown

    python benchmarks/faults.py [--data ../shared/data/sst2] [--only NAME]

Target: every row a clear message, no run left RUNNING, no partial report (a hidden temp
folder in the reports folder), no traceback shown to the user for an expected error. Config
errors should come within 3 s and data errors within 10 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = str(Path(sys.executable).parent / "peft-bench")


@dataclass
class Row:
    fault: str
    code: int
    seconds: float
    message: str
    runs: str
    partial: int
    traceback: bool


def base_config(work: Path, model: Path, data: Path) -> dict:
    return {"name": "faults", "model": {"name_or_path": str(model)},
            "data": {"source": str(data), "train_size": 64, "eval_size": 32, "max_length": 32},
            "methods": [{"name": "full", "method": "full"},
                        {"name": "lora", "method": "lora", "rank": 4, "alpha": 8,
                         "targets": ["c_attn"]}],
            "training": {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "device": "cpu"},
            "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "faults"},
            "report": {"output_dir": str(work / "reports")}}


def run_cli(args: list[str], work: Path, env_extra: dict | None = None,
            timeout: float = 600) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PEFT_BENCH_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", **(env_extra or {}))
    t0 = time.perf_counter()
    out = subprocess.run([CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, time.perf_counter() - t0, out.stdout + out.stderr


def runs_by_status(work: Path) -> str:
    db = work / "mlflow.db"
    if not db.exists():
        return "no store"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("faults")
    if exp is None:
        return "0 runs"
    counts: dict[str, int] = {}
    for r in client.search_runs([exp.experiment_id]):
        counts[r.info.status] = counts.get(r.info.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "0 runs"


def message_of(output: str) -> str:
    """The error line, with its first detail line when it ends in a colon-less header."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            text = line[len("error:"):].strip()
            if text.endswith("invalid config") and i + 1 < len(lines):
                text += ": " + lines[i + 1].strip()
            return text[:120]
    return "(no error line)"


def case(work: Path, cfg: dict, name: str, sets: list[str], env: dict | None = None,
         extra: list[str] | None = None) -> Row:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg).replace("@WORK@", str(work)))))
    args = ["run", str(path), *[a for s in sets for a in ("--set", s)], *(extra or [])]
    code, secs, out = run_cli(args, work, env)
    reports = work / "reports"
    partial = len([p for p in reports.iterdir() if p.name.startswith(".")]) if reports.exists() else 0
    return Row(name, code, secs, message_of(out) if code else "finished", runs_by_status(work),
               partial, "Traceback" in out)


def write_data(folder: Path, train: str, validation: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(train)
    (folder / "validation.tsv").write_text(validation)
    return folder


def broken_models(root: Path, model: Path) -> dict[str, Path]:
    """Copies of the model, each with one file broken."""
    def copy(name: str, config: Optional[dict] = None, drop: str = "") -> Path:
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model, folder)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(
                {**json.loads((folder / "config.json").read_text()), **config}))
        if drop:
            (folder / drop).unlink()
        return folder

    out = {"notjson": copy("notjson"), "wrongtype": copy("wrongtype", {"n_embd": "sixty-four"}),
           "noweights": copy("noweights", drop="model.safetensors"),
           "pickle": copy("pickle", drop="model.safetensors"),
           "shapes": copy("shapes", {"vocab_size": 600})}  # the weights' embedding: 512 rows
    (out["notjson"] / "config.json").write_text('{"n_embd": 32,')
    # A pickle that would create a file if anything unpickled it: it must never be opened.
    (out["pickle"] / "pytorch_model.bin").write_bytes(
        b"cbuiltins\nopen\n(V" + str(root / "pickle-ran").encode() + b"\nVw\ntR.")
    return out


def simple_cases(root: Path, model: Path, data: Path) -> list[tuple[str, list[str], dict]]:
    """(fault, --set overrides, environment): one CLI run each."""
    good = "sentence\tlabel\nfine\t1\nbad\t0\nok\t1\n"
    odd = write_data(root / "odd", good, "sentence\tlabel\nfine\t1\nodd\t2\n")
    one = write_data(root / "one", "sentence\tlabel\na\t1\nb\t1\n", good)
    nolabel = write_data(root / "nolabel", "sentence\tstars\na\t1\n", good)
    badutf = root / "badutf"
    write_data(badutf, good, good)
    (badutf / "train.tsv").write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n")
    bare = root / "bare-model"
    bare.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    small = ["data.train_size=null", "data.eval_size=null"]
    broken = broken_models(root, model)
    return [
        ("config: unknown key", ["training.lrr=1"], {}),
        ("config: value out of range", ["training.lr=-1"], {}),
        ("config: unknown method kind", ["methods.0.method=prefix"], {}),
        ("data: folder missing", [f"data.source={root}/none"], {}),
        ("data: column missing", [f"data.source={nolabel}", *small], {}),
        ("data: not UTF-8", [f"data.source={badutf}", *small], {}),
        ("data: eval label outside the training classes", [f"data.source={odd}", *small], {}),
        ("data: train_size above the rows", ["data.train_size=10000000"], {}),
        ("data: one class only", [f"data.source={one}", *small], {}),
        ("model: folder missing", [f"model.name_or_path={root}/no-model"], {}),
        ("model: no tokenizer files", [f"model.name_or_path={bare}"], {}),
        ("model: config.json not JSON", [f"model.name_or_path={broken['notjson']}"], {}),
        ("model: config.json field of the wrong type",
         [f"model.name_or_path={broken['wrongtype']}"], {}),
        ("model: no weights", [f"model.name_or_path={broken['noweights']}"], {}),
        ("model: pickle-only weights (code must not run)",
         [f"model.name_or_path={broken['pickle']}"], {}),
        ("model: weights do not fit the config", [f"model.name_or_path={broken['shapes']}"], {}),
        ("targets match no layer", ["methods.1.targets=[no_such_layer]"], {}),
        ("report folder not writable", ["report.output_dir=/proc/peft-bench"], {}),
        ("MLflow server unreachable", ["tracking.tracking_uri=http://u:pw@127.0.0.1:9"], {}),
        ("Prefect server does not start", [], {"PEFT_BENCH_SERVER_TIMEOUT": "0.05"}),
        ("training diverges (lr 1e6)", ["methods.0.lr=1e6"], {}),
    ]


def checkpointed_run(work: Path, cfg: dict) -> tuple[dict, dict]:
    """A fresh `work` folder with a 400-step config that checkpoints every 20 steps (c.yaml),
    and the environment to run the CLI on it."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = json.loads(json.dumps(cfg).replace("@WORK@", str(work)))
    cfg["training"].update(max_steps=400, checkpoint_every=20, checkpoint_dir=str(work / "ckpt"))
    cfg["data"]["train_size"] = 400
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PEFT_BENCH_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")
    return cfg, env


def kill_and_resume(root: Path, cfg: dict) -> list[Row]:
    """SIGKILL the CLI mid-training; then the next start closes the stale runs and
    --resume finishes them."""
    work = root / "kill"
    cfg, env = checkpointed_run(work, cfg)
    t0 = time.perf_counter()
    proc = subprocess.Popen([CLI, "run", str(work / "c.yaml")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((work / "ckpt").glob("*/latest")) and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    secs = time.perf_counter() - t0
    killed = Row("kill -9 mid-training", -9, secs, "(killed)", runs_by_status(work), 0, False)
    time.sleep(2)
    servers = subprocess.run(["pgrep", "-f", "prefect.server.api.server:create_app"],
                             capture_output=True, text=True).stdout.split()
    parent = next(iter(_running_parents(work)), "")
    code, secs, out = run_cli(["run", "--resume", parent, "--set",
                               f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "--set",
                               "tracking.experiment=faults"], work)
    resumed = Row(f"... --resume (stray servers after kill: {len(servers)})", code, secs,
                  message_of(out) if code else "resumed and finished", runs_by_status(work), 0,
                  "Traceback" in out)
    return [killed, resumed]


def truncated_checkpoint(root: Path, cfg: dict) -> list[Row]:
    """SIGKILL the CLI once two checkpoints exist, truncate the latest one's tensors, then
    --resume: the damaged checkpoint is named and skipped for the previous one."""
    from mlflow.tracking import MlflowClient

    from tasks.common import names

    work = root / "truncated"
    cfg, env = checkpointed_run(work, cfg)
    proc = subprocess.Popen([CLI, "run", str(work / "c.yaml")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (len(list((work / "ckpt").glob("*/step-*/manifest.json"))) < 2
           and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    run_dir = next(p.parent for p in (work / "ckpt").glob("*/latest"))
    tensors = run_dir / (run_dir / "latest").read_text() / "trainable.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:tensors.stat().st_size // 2])
    parent = next(iter(_running_parents(work)), "")
    code, secs, out = run_cli(["run", "--resume", parent, "--set",
                               f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "--set",
                               "tracking.experiment=faults"], work)
    run = MlflowClient(f"sqlite:///{work}/mlflow.db").get_run(run_dir.name)
    note = run.data.tags.get(names.RESUME_NOTE, "(no resume note on the run)")
    message = message_of(out) if code else note.replace(str(work) + "/", "")
    return [Row("truncated checkpoint on resume", code, secs, message, runs_by_status(work), 0,
                "Traceback" in out)]


def _running_parents(work: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("faults")
    return [r.info.run_id for r in client.search_runs(
        [exp.experiment_id], "tags.`peft_bench.role` = 'parent'")]


def concurrent(root: Path, cfg: dict) -> Row:
    work = root / "concurrent"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "c.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg).replace("@WORK@", str(work)))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PEFT_BENCH_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([CLI, "run", str(work / "c.yaml")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    return Row("two first runs at once, new sqlite store", max(codes), time.perf_counter() - t0,
               f"exit codes {codes}", runs_by_status(work), 0, any("Traceback" in o for o in outs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--only", default=None, help="run the faults whose name contains this")
    args = ap.parse_args()
    from tasks.models.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="peft-bench-faults-"))
    model = make_tiny_model(root / "tiny", Path(args.data), vocab_size=512, n_layer=2, n_embd=32,
                            n_head=2, max_train_lines=5000)
    cfg = base_config(Path("@WORK@"), model, Path(args.data))
    from benchmarks import faults_hostile as hostile

    rows = []
    cases = simple_cases(root, model, Path(args.data)) + hostile.data_cases(root)
    for i, (name, sets, env) in enumerate(cases):
        if args.only is None or args.only in name:
            rows.append(case(root / f"w{i}", cfg, name, sets, env))
            print(f"  {name}: exit {rows[-1].code} in {rows[-1].seconds:.1f} s", flush=True)
    if args.only is None or "kill" in args.only:
        rows += kill_and_resume(root, cfg)
    if args.only is None or "truncated" in args.only:
        rows += truncated_checkpoint(root, cfg)
    if args.only is None or "concurrent" in args.only:
        rows.append(concurrent(root, cfg))
    if args.only is None or "name" in args.only or "id" in args.only:
        rows += hostile.quoted_name_and_ids(root, cfg)
    if args.only is None or "SIGTERM" in args.only:
        rows.append(hostile.sigterm(root, cfg))
    if args.only is None or "server" in args.only:
        rows += hostile.server_outage(root, cfg)
    print("\n| fault | exit | s to error | message | MLflow runs left | partial reports | traceback |")
    print("|---|---:|---:|---|---|---:|---|")
    for r in rows:
        print(f"| {r.fault} | {r.code} | {r.seconds:.1f} | {r.message.replace('|', '/')} | "
              f"{r.runs} | {r.partial} | {'yes' if r.traceback else 'no'} |")
    running = sum("RUNNING" in r.runs for r in rows if not r.fault.startswith("kill -9"))
    print(f"\nrows with a run left RUNNING (the kill row shows the state the next start "
          f"repairs): {running}; with a traceback: "
          f"{sum(r.traceback for r in rows)}; with a partial report: {sum(r.partial > 0 for r in rows)}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
