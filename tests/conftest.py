"""Shared fixtures. One Prefect test server for the whole session: it costs ~20 s to start."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    if not (SST2 / "train.tsv").is_file():
        pytest.fail(f"SST-2 data not found at {SST2}")
    return SST2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sst2_dir) -> Path:
    """A small random GPT-2-style model built offline, loaded back via from_pretrained."""
    from tasks.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-gpt2")
    return make_tiny_model(out, sst2_dir, vocab_size=512, n_layer=2, n_embd=32, n_head=2,
                           max_train_lines=5000)


def make_bench_config(tmp_path: Path, tiny_model_dir: Path, sst2_dir: Path) -> dict:
    """A quickstart-shaped config, small enough for CI: 4 methods, a few steps each."""
    return {
        "name": "ci",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": str(sst2_dir), "train_size": 96, "eval_size": 48, "max_length": 32},
        "methods": [
            {"name": "full", "method": "full"},
            {"name": "lora", "method": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn"]},
            {"name": "dora", "method": "dora", "rank": 4, "alpha": 8, "targets": ["c_attn"]},
            {"name": "qlora", "method": "qlora", "rank": 4, "alpha": 8, "targets": ["c_attn"]},
        ],
        "training": {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "eval_every": 2,
                     "device": "cpu", "log_every": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "ci",
                     "system_metrics_interval_s": 1.0},
        "report": {"output_dir": str(tmp_path / "reports")},
    }


@pytest.fixture
def bench_config(tmp_path, tiny_model_dir, sst2_dir) -> dict:
    return make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
