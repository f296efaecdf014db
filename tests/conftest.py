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
