"""Faults, for real: a diverging method, a CLI killed with SIGKILL and resumed, two first runs
at once on a new sqlite store, bad input caught before any weights load or any MLflow run, the
temporary Prefect server's lifetime, credentials kept out of every record."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from _procs import kill_all
from conftest import ROOT, ceiling, make_bench_config
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.benchmark import benchmark
from flows.cli.main import app
from tasks.report import read_children

runner = CliRunner()


def _cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PEFT_BENCH_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "peft-bench"), *args]


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------ divergence
def test_diverged_method_fails_loudly_and_the_others_finish(prefect_harness, tmp_path,
                                                            tiny_model_dir, sst2_dir):
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = [cfg["methods"][1], {"name": "boom", "method": "full", "lr": 1.0e6}]
    cfg["training"]["max_steps"] = 8
    result = benchmark(config=cfg)
    assert result["failed"] == ["boom/seed=42"]
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    kids = {r.data.tags["peft_bench.method"]: r for r in read_children(
        cfg["tracking"]["tracking_uri"], result["parent_run_id"])}
    boom = kids["boom"]
    assert boom.info.status == "FAILED" and kids["lora"].info.status == "FINISHED"
    error = boom.data.tags["peft_bench.error"]
    assert "training diverged at step" in error and "lower the learning rate (now 1e+06)" in error
    assert "last finite loss" in error
    assert not [a for a in client.list_artifacts(boom.info.run_id) if a.path == "adapter"]
    summary = json.loads((Path(result["report_html"]).parent / "summary.json").read_text())
    assert summary["chart_methods"] == ["lora"]
    row = next(m for m in summary["methods"] if m["method"] == "boom")
    assert row["status"] == "FAILED" and row["pareto_optimal"] is None and row["accuracy"] is None
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"


# ------------------------------------------------------------------ kill -9 and resume
def _resume_config(tmp_path, tiny_model_dir, sst2_dir, store: str) -> dict:
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["name"] = "resume"
    cfg["methods"] = [cfg["methods"][0], {**cfg["methods"][1], "dropout": 0.1}]
    cfg["data"].update(train_size=144)  # 9 batches an epoch: the resume lands mid-epoch 2+
    cfg["training"].update(max_steps=150, eval_every=40, checkpoint_every=10, num_threads=1,
                           checkpoint_dir=str(tmp_path / "ckpt"))
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / store}"
    return cfg


def _lora_checkpointed(ckpt: Path, uri: str) -> bool:
    runs = [r for r in _runs(uri, "ci") if r.data.tags.get("peft_bench.method") == "lora"]
    return bool(runs) and (ckpt / runs[0].info.run_id / "latest").is_file()


def test_killed_cli_is_closed_and_resumes_to_identical_results(prefect_harness, tmp_path,
                                                               tiny_model_dir, sst2_dir):
    ref_cfg = _resume_config(tmp_path / "ref", tiny_model_dir, sst2_dir, "ref.db")
    reference = benchmark(config=ref_cfg)  # uninterrupted, in this process
    cfg = _resume_config(tmp_path, tiny_model_dir, sst2_dir, "mlflow.db")
    uri, ckpt = cfg["tracking"]["tracking_uri"], tmp_path / "ckpt"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = _cli_env(tmp_path)
    proc = subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the event: LoRA's first checkpoint; the ceiling only catches a hang
        deadline = time.monotonic() + ceiling(240)
        while not _lora_checkpointed(ckpt, uri) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        servers = [json.loads(p.read_text()) for p in (tmp_path / "cache/servers").glob("*.json")]
    finally:
        proc.kill()
        proc.wait()
    assert _lora_checkpointed(ckpt, uri)
    # The temporary Prefect server died with the CLI (parent-death signal).
    assert len(servers) == 1 and _gone(servers[0]["pid"])
    left = {r.data.tags.get("peft_bench.method", "parent"): r for r in _runs(uri, "ci")}
    assert left["parent"].info.status == "RUNNING" and left["lora"].info.status == "RUNNING"
    assert left["full"].info.status == "FINISHED"
    parent = left["parent"].info.run_id

    out = subprocess.run(_cli("run", "--resume", parent, "--set", f"tracking.tracking_uri={uri}",
                              "--set", "tracking.experiment=ci"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "closed stale MLflow run" in out.stdout
    after = {r.data.tags.get("peft_bench.method", "parent"): r for r in _runs(uri, "ci")
             if r.data.tags.get("peft_bench.role") != "aggregate"}
    assert len(after) == 3 and {r.info.status for r in after.values()} == {"FINISHED"}
    assert after["parent"].info.run_id == parent  # the same MLflow runs, continued
    assert after["lora"].info.run_id == left["lora"].info.run_id
    assert int(after["lora"].data.tags["peft_bench.resumed_from_step"]) in range(10, 150, 10)
    assert after["full"].info.end_time == left["full"].info.end_time  # not re-run
    assert "peft_bench.resumed_from_step" not in after["full"].data.tags
    ref = {r.data.tags["peft_bench.method"]: r.data.metrics for r in read_children(
        ref_cfg["tracking"]["tracking_uri"], reference["parent_run_id"])}
    for method in ("full", "lora"):  # bit-identical on CPU
        for metric in ("eval/accuracy", "eval/loss", "eval/f1_macro", "train/loss", "train_steps"):
            assert after[method].data.metrics[metric] == ref[method][metric], (method, metric)
    assert not any(ckpt.iterdir())  # checkpoints deleted once the runs finished


def test_sigterm_ends_the_cli_143_with_every_run_failed_and_its_server_stopped(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    """SIGTERM (kill, systemd, Docker, Kubernetes, a Prefect cancellation) mid-training is
    handled like Ctrl-C: the runs end FAILED with the reason, the temporary server is stopped,
    the exit is 143 (it was -15, the runs closed only by whoever came next)."""
    cfg = _resume_config(tmp_path, tiny_model_dir, sst2_dir, "mlflow.db")
    uri, ckpt = cfg["tracking"]["tracking_uri"], tmp_path / "ckpt"
    cfg["methods"] = cfg["methods"][1:]  # LoRA only: it must be training when the signal comes
    cfg["training"]["max_steps"] = 100000
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT,
                            env=_cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:  # the event: a LoRA checkpoint exists, so LoRA is training
        deadline = time.monotonic() + ceiling(240)
        while not _lora_checkpointed(ckpt, uri) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the signal"
            time.sleep(0.2)
        assert _lora_checkpointed(ckpt, uri), "LoRA never checkpointed"
        servers = [json.loads(p.read_text()) for p in (tmp_path / "cache/servers").glob("*.json")]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=ceiling(120))
    finally:
        if proc.poll() is None:  # a hang: nothing of it may outlive the test
            kill_all([psutil.Process(proc.pid)])
            proc.communicate()
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # On a line of its own, not glued to the last frame of a progress bar.
    assert any(line.startswith("error: terminated by SIGTERM")
               for line in output.replace("\r", "\n").splitlines()), output[-3000:]
    runs = {r.data.tags.get("peft_bench.method", "parent"): r for r in _runs(uri, "ci")}
    assert {r.info.status for r in runs.values()} <= {"FINISHED", "FAILED"}
    for who in ("parent", "lora"):
        assert runs[who].info.status == "FAILED", who
        assert "terminated by SIGTERM" in runs[who].data.tags["peft_bench.error"], who
    assert len(servers) == 1 and _gone(servers[0]["pid"])


# ------------------------------------------------------------------ concurrent first runs
def test_two_first_runs_at_once_on_a_new_sqlite_store(tmp_path, tiny_model_dir, sst2_dir):
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = cfg["methods"][1:2]
    cfg["training"].update(max_steps=2, eval_every=None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = _cli_env(tmp_path)
    procs = [subprocess.Popen(_cli("run", str(tmp_path / "c.yaml")), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=ceiling(600))[0] for p in procs]
    finally:  # a hung run must not outlive the test
        kill_all(psutil.Process(p.pid) for p in procs if p.poll() is None)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    parents = [r for r in _runs(cfg["tracking"]["tracking_uri"], "ci")
               if r.data.tags["peft_bench.role"] == "parent"]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}


# ------------------------------------------------------------------ checks before anything
def _no_tokenizer(tmp_path, model):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for f in model.iterdir():
        if f.name in ("config.json",) or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    return [f"model.name_or_path={bare}"]


def _data(tmp_path, train: str, validation: str) -> list[str]:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.tsv").write_text(train)
    (folder / "validation.tsv").write_text(validation)
    return [f"data.source={folder}", "data.train_size=null", "data.eval_size=null"]


GOOD = "sentence\tlabel\nfine\t1\nbad\t0\n"
EARLY = {
    "unwritable output": (lambda t, m: ["report.output_dir=/proc/peft-bench-reports"],
                          "report.output_dir: /proc/peft-bench-reports is not writable"),
    "targets match nothing": (lambda t, m: ["methods.1.targets=[no_such_layer]"],
                              "methods.1 (lora): "),
    "model without tokenizer": (_no_tokenizer, "has no tokenizer files"),
    "eval label outside the training classes": (
        lambda t, m: _data(t, GOOD, "sentence\tlabel\nok\t1\nodd\t2\n"),
        "validation.tsv: line 3: column 'label': label 2 is outside [0, 2)"),
    "train_size above the rows": (lambda t, m: ["data.train_size=10000000"],
                                  "data.train_size = 10,000,000 but"),
    "one class only": (lambda t, m: _data(t, "sentence\tlabel\na\t1\nb\t1\n", GOOD),
                       "every training row has label 1"),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_bad_input_is_refused_before_weights_load_or_a_run_exists(case, tmp_path, bench_config,
                                                                  tiny_model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    def tripwire(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", tripwire)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", tripwire)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench_config))
    make, message = EARLY[case]
    sets = [a for s in make(tmp_path, tiny_model_dir) for a in ("--set", s)]
    result = runner.invoke(app, ["run", str(path), *sets])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    db = Path(bench_config["tracking"]["tracking_uri"].removeprefix("sqlite:///"))
    assert not db.exists() or _runs(bench_config["tracking"]["tracking_uri"], "ci") == []


# ------------------------------------------------------------------ the temporary server
def test_an_orphaned_temporary_server_is_stopped_by_the_next_start(tmp_path, monkeypatch):
    from flows.infra import tempserver

    monkeypatch.setenv("PEFT_BENCH_CACHE", str(tmp_path))
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # an owner that is gone
    record = tempserver.servers_dir() / f"{server.pid}.json"
    record.write_text(json.dumps({"pid": server.pid,
                                  "started": psutil.Process(server.pid).create_time(),
                                  "owner_pid": dead.pid, "owner_started": 0.0}))
    mine = tempserver.servers_dir() / "live.json"  # owned by this live process: kept
    me = psutil.Process()
    mine.write_text(json.dumps({"pid": me.pid, "started": me.create_time(), "owner_pid": me.pid,
                                "owner_started": me.create_time()}))
    try:
        assert tempserver.reap_orphans() == [server.pid]
        assert server.wait(timeout=15) is not None and not record.exists() and mine.exists()
    finally:
        server.kill()


def test_a_server_that_does_not_start_says_what_to_do(tmp_path, monkeypatch):
    from flows.infra import tempserver

    monkeypatch.setenv("PEFT_BENCH_CACHE", str(tmp_path))
    with pytest.raises(tempserver.ServerStartError) as err:
        tempserver.start(timeout_s=0.05, tries=2)
    assert "did not answer within 0 s (2 tries)" in str(err.value)
    assert "--server-timeout" in str(err.value) and "PREFECT_API_URL" in str(err.value)
    assert list(tempserver.servers_dir().glob("*.json")) == []  # nothing left running


# ------------------------------------------------------------------ secrets
def test_credentials_leave_no_trace(prefect_harness, tmp_path, tiny_model_dir, sst2_dir, capfd):
    from prefect.client.orchestration import get_client

    from flows.infra import stack

    secrets = ("S3CRET-PW", "HUNTER2")
    ml = stack.start_mlflow_server(tmp_path / "stack", port=0)
    try:
        uri = ml.url.replace("http://", "http://alice:S3CRET-PW@")
        model = tmp_path / "bob:HUNTER2@tiny"
        shutil.copytree(tiny_model_dir, model)
        cfg = make_bench_config(tmp_path, model, sst2_dir)
        cfg["methods"] = cfg["methods"][1:2]
        cfg["training"].update(max_steps=2, eval_every=None)
        cfg["tracking"]["experiment"] = "secrets"
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["run", str(tmp_path / "s.yaml"),
                                     "--set", f"tracking.tracking_uri={uri}"])
        assert result.exit_code == 0, result.output
        seen = result.output + "".join(capfd.readouterr())
        client = MlflowClient(ml.url)
        for run in _runs(ml.url, "secrets"):
            seen += json.dumps([run.data.params, run.data.tags, str(run.inputs)])
            for art in ("config.yaml",):
                if any(a.path == art for a in client.list_artifacts(run.info.run_id)):
                    seen += Path(client.download_artifacts(run.info.run_id, art, str(tmp_path))).read_text()
        with get_client(sync_client=True) as pc:
            seen += json.dumps([fr.parameters for fr in pc.read_flow_runs(limit=200)], default=str)
        assert "alice:***@" in seen and "bob:***@tiny" in seen  # masked, not missing
        for secret in secrets:
            assert secret not in seen, secret
    finally:
        stack.stop_procs([ml])
