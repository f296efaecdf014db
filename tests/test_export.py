"""A benchmark's winner, used elsewhere: every child run's adapter loads in Hugging Face peft
(the oracle) and scores the run's own accuracy; `export --merged` gives a plain transformers
model that does the same; `promote` registers the adapter and it loads back from the registry."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from _models import load_4bit
from conftest import make_bench_config
from mlflow import MlflowClient
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from flows.benchmark import benchmark
from flows.cli.main import app
from tasks.config.schema import DataConfig
from tasks.evaluate import evaluate_model
from tasks.prepare import tokenize_splits
from tasks.report import read_children

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    tmp = tmp_path_factory.mktemp("export")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["methods"] = [cfg["methods"][0], {**cfg["methods"][2], "dropout": 0.1},
                      cfg["methods"][3]]  # full, dora, qlora
    result = benchmark(config=cfg)
    uri = cfg["tracking"]["tracking_uri"]
    runs = {r.data.tags["peft_bench.method"]: r for r in read_children(uri, result["parent_run_id"])}
    data = tokenize_splits(DataConfig.model_validate(cfg["data"]), str(tiny_model_dir))
    return cfg, uri, runs, data, tmp


def _accuracy(model, data) -> float:
    return evaluate_model(model.eval(), data.eval, data.num_labels, data.pad_token_id,
                          torch.device("cpu")).metrics["accuracy"]


def _base(tiny_model_dir, data):
    torch.manual_seed(123)  # the head is replaced by the adapter's modules_to_save anyway
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model.config.pad_token_id = data.pad_token_id
    return model


@pytest.mark.parametrize("method", ["dora"])
def test_every_run_logs_a_peft_adapter_that_peft_loads(trained, tiny_model_dir, method, tmp_path):
    cfg, uri, runs, data, _ = trained
    run = runs[method]
    folder = Path(MlflowClient(uri).download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    model = PeftModel.from_pretrained(_base(tiny_model_dir, data), folder)
    assert _accuracy(model, data) == run.data.metrics["eval/accuracy"]


def test_export_writes_the_peft_adapter_and_a_merged_model(trained, tiny_model_dir, tmp_path):
    cfg, uri, runs, data, _ = trained
    run = runs["dora"]
    out = runner.invoke(app, ["export", run.info.run_id, str(tmp_path / "a"), "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    peft_model = PeftModel.from_pretrained(_base(tiny_model_dir, data), tmp_path / "a")
    assert _accuracy(peft_model, data) == run.data.metrics["eval/accuracy"]
    out = runner.invoke(app, ["export", run.info.run_id, str(tmp_path / "m"), "--merged",
                              "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    plain.config.pad_token_id = data.pad_token_id
    assert _accuracy(plain, data) == pytest.approx(run.data.metrics["eval/accuracy"], abs=1e-9)
    assert not any("lora" in n for n, _ in plain.named_parameters())  # an ordinary model
    full = runs["full"]
    out = runner.invoke(app, ["export", full.info.run_id, str(tmp_path / "f"), "--merged",
                              "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f")
    model.config.pad_token_id = data.pad_token_id
    assert _accuracy(model, data) == pytest.approx(full.data.metrics["eval/accuracy"], abs=1e-9)


def test_export_refuses_what_it_cannot(trained, tmp_path):
    cfg, uri, runs, _, _ = trained
    parent = runs["dora"].data.tags["mlflow.parentRunId"]
    out = runner.invoke(app, ["export", parent, str(tmp_path / "x"), "--tracking-uri", uri])
    assert out.exit_code == 1 and "is not a training run" in out.output
    out = runner.invoke(app, ["promote", runs["full"].info.run_id, "--name", "x",
                              "--tracking-uri", uri])
    assert out.exit_code == 1 and "has no adapter to register" in out.output


def test_promote_registers_a_version_that_loads_back(trained, tiny_model_dir, tmp_path,
                                                     monkeypatch):
    cfg, uri, runs, data, _ = trained
    run = runs["qlora"]
    out = runner.invoke(app, ["promote", run.info.run_id, "--name", "sst2-adapter",
                              "--alias", "champion", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("sst2-adapter", "champion")
    assert version.tags["method"] == "qlora" and version.tags["base_model"] == str(tiny_model_dir)
    assert version.tags["benchmark"] == "ci" and version.run_id == run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a user of the registry would have it
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    folder = mlflow.artifacts.download_artifacts(artifact_uri="models:/sst2-adapter@champion",
                                                 dst_path=str(tmp_path / "reg"))
    # The adapter was trained on an NF4 base: peft loads it onto the same 4-bit base.
    base = load_4bit(tiny_model_dir)
    base.config.pad_token_id = data.pad_token_id
    model = PeftModel.from_pretrained(base, folder)
    assert _accuracy(model, data) == run.data.metrics["eval/accuracy"]


def test_export_never_deletes_a_users_file(trained, tiny_model_dir, tmp_path):
    """A non-empty folder is refused without --force; with it, only our files are replaced,
    and a later export of another kind removes our stale files but not the user's."""
    cfg, uri, runs, data, _ = trained
    run = runs["dora"].info.run_id
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("my notes")
    (dest / "sub").mkdir()
    (dest / "sub" / "keep.bin").write_bytes(b"\x00\x01")
    out = runner.invoke(app, ["export", run, str(dest), "--tracking-uri", uri])
    assert out.exit_code == 2, out.output
    assert str(dest) in out.output and "--force" in out.output and "notes.txt" in out.output
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt", "sub"]  # nothing written

    out = runner.invoke(app, ["export", run, str(dest), "--force", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert (dest / "notes.txt").read_text() == "my notes"
    assert (dest / "sub" / "keep.bin").read_bytes() == b"\x00\x01"
    model = PeftModel.from_pretrained(_base(tiny_model_dir, data), dest)
    assert _accuracy(model, data) == runs["dora"].data.metrics["eval/accuracy"]

    out = runner.invoke(app, ["export", run, str(dest), "--merged", "--force",
                              "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert not (dest / "adapter_config.json").exists()  # ours and stale: a merged model now
    assert (dest / "notes.txt").read_text() == "my notes"
    assert (dest / "sub" / "keep.bin").read_bytes() == b"\x00\x01"
    plain = AutoModelForSequenceClassification.from_pretrained(dest)
    plain.config.pad_token_id = data.pad_token_id
    assert _accuracy(plain, data) == pytest.approx(runs["dora"].data.metrics["eval/accuracy"],
                                                   abs=1e-9)
    assert not list(tmp_path.glob(".mine.*"))  # no staging folder left beside it
