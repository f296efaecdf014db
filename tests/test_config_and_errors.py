"""The typed config, the units of the pipeline, and bad input: every error names its field,
file or line, comes before any model is loaded, and leaves no MLflow run behind."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from tasks.config.build import build_config, load_config
from tasks.config.schema import ConfigError
from tasks.evaluate import compute_metrics
from tasks.training.memory import PeakMemory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart.yaml", "quickstart-tiny.yaml", "sst2-gpt2.yaml",
                                  "sst2-gpt2-large-seed.yaml", "sst2-minilm.yaml",
                                  "glue-mrpc-gpt2.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name, mlflow_yaml=ROOT / "mlflow.yaml")
    assert [m.method for m in cfg.methods] == ["full", "lora", "dora", "qlora"]
    assert cfg.methods[3].quantization.quant_type == "nf4"


def test_seed_config_is_the_write_up_setup_with_one_optimiser():
    cfg = load_config(ROOT / "configs" / "sst2-gpt2-large-seed.yaml", mlflow_yaml=None)
    assert cfg.model.name_or_path == "openai-community/gpt2-large"
    assert (cfg.data.train_size, cfg.data.max_length, cfg.training.batch_size) == (15000, 32, 32)
    assert cfg.data.subset == "first"
    assert cfg.training.epochs == 5 and all(m.lr is None for m in cfg.methods)
    assert {(m.rank, m.alpha) for m in cfg.methods if m.method != "full"} == {(4, 4.0)}


def test_overrides_keep_types_and_env_wins(monkeypatch, bench_config):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    cfg = build_config(bench_config, overrides=["training.lr=5e-5", "methods.1.rank=16",
                                                 "data.max_length=48"], mlflow_yaml=None)
    assert cfg.training.lr == 5e-5 and cfg.methods[1].rank == 16 and cfg.data.max_length == 48
    assert cfg.tracking.tracking_uri == "sqlite:///from-env.db"


def test_mlflow_yaml_supplies_tracking(tmp_path, bench_config):
    (tmp_path / "m.yaml").write_text("tracking_uri: sqlite:///x.db\nexperiment: nightly\n")
    raw = {k: v for k, v in bench_config.items() if k != "tracking"}
    cfg = build_config(raw, mlflow_yaml=tmp_path / "m.yaml")
    assert (cfg.tracking.tracking_uri, cfg.tracking.experiment) == ("sqlite:///x.db", "nightly")


@pytest.mark.parametrize("override,message", [
    ("training.bogus=1", "training.bogus: Extra inputs are not permitted"),
    ("methods.1.method=ia3", "methods.1.method: Input should be 'full', 'lora'"),
    ("methods.1.rank=0", "methods.1.rank: Input should be greater than 0"),
    ("training.lr=-1", "training.lr: Input should be greater than 0"),
    ("methods.2.dropout=1.5", "methods.2.dropout: Input should be less than 1"),
    ("data.max_length=1", "data.max_length: Input should be greater than or equal to 2"),
    ("methods.1.name=full", "duplicate method names ['full']"),
])
def test_bad_config_names_the_field(bench_config, override, message):
    with pytest.raises(ConfigError, match="invalid config") as e:
        build_config(bench_config, "my.yaml", [override], mlflow_yaml=None)
    assert message in str(e.value) and str(e.value).startswith("my.yaml")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


def _runs(cfg: dict) -> list:
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _write_split(folder: Path, name: str, text: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)


@pytest.mark.parametrize("case,message", [
    ("model_dir", "model.name_or_path: directory not found"),
    ("data_dir", "does-not-exist"),
    ("column", "'sentence'"),
    ("empty", "train.tsv: split 'train' has no rows"),
    ("label", "line 3"),
    ("decode", "line 2"),
    ("unknown_method", "methods.0.method"),
])
def test_bad_input_fails_before_any_run(prefect_harness, tmp_path, bench_config, case, message):
    cfg, data = bench_config, tmp_path / "data"
    good = "sentence\tlabel\na fine film\t1\n"
    if case == "model_dir":
        cfg["model"]["name_or_path"] = str(tmp_path / "no-model")
    elif case == "data_dir":
        cfg["data"]["source"] = str(tmp_path / "does-not-exist")
    elif case == "unknown_method":
        cfg["methods"][0]["method"] = "prefix-tuning"
    else:
        train = {"column": "text\tlabel\nfine\t1\n", "empty": "sentence\tlabel\n",
                 "label": "sentence\tlabel\ngood\t1\nbad\tseven\n"}.get(case, good)
        _write_split(data, "train.tsv", train)
        (data / "validation.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad bytes\t0\n"
                                              if case == "decode" else good.encode())
        cfg["data"]["source"] = str(data)
        cfg["data"].update(train_size=None, eval_size=None)
    with pytest.raises(ValueError) as e:
        benchmark(config=cfg)
    assert message in str(e.value)
    assert _runs(cfg) == []  # no MLflow run for input that fails validation


def test_metrics_on_hand_made_predictions():
    labels, preds = [0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1]
    m = compute_metrics(labels, preds, num_labels=3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # per class precision: 1/2, 2/4, 0 (never predicted); recall: 1/2, 2/3, 0
    assert m["precision"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["recall"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    f1 = [2 * p * r / (p + r) if p + r else 0 for p, r in ((0.5, 0.5), (0.5, 2 / 3), (0, 0))]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)


def _method(mb: int) -> float:
    with PeakMemory("cpu", interval_s=0.002) as pm:
        x = torch.ones(mb * 2**20 // 4)
        time.sleep(0.05)
        del x
    return pm.peak_mb


def test_peak_memory_isolation():
    """A method that allocates X MB more reports about X MB more, whatever ran before it."""
    small, big, small_again = _method(64), _method(256), _method(64)
    assert big - small == pytest.approx(192, abs=20)
    assert small_again == pytest.approx(small, abs=20)  # does not inherit big's peak
    with PeakMemory("cpu") as pm:
        with pm.excluded():
            y = torch.ones(128 * 2**20 // 4)
            del y
    assert pm.peak_mb < 20


def test_subset_first_takes_the_first_rows(sst2_dir):
    from tasks.config.schema import DataConfig
    from tasks.data.dataset import load_splits

    first = load_splits(DataConfig(source=str(sst2_dir), train_size=5, subset="first"))["train"]
    head = [ln.split("\t")[0] for ln in
            (sst2_dir / "train.tsv").read_text(encoding="utf-8").splitlines()[1:6]]
    assert first["text"].tolist() == head
