"""Shared fixtures. One Prefect test server for the whole session: it costs ~20 s to start."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import _procs
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inherited by every process the suite starts, however far it strays from our process tree:
# the session's last check finds whatever is still alive by it (_procs.marked).
SESSION = os.environ[_procs.MARKER] = uuid.uuid4().hex
SPEED: float = 1.0  # the machine's slowness at session start (_procs.speed_factor)
_OFFSET: float = 0.0  # psutil's create_time clock minus time.time() (_procs.clock_offset)
_started: list[tuple[float, str]] = []  # (epoch seconds, test id): who started a leftover


def ceiling(seconds: float) -> float:
    """A wait's upper bound, scaled by the machine's measured slowness: it only catches real
    hangs, on a quiet machine or a loaded one. Tests wait for events; this bounds the wait."""
    return seconds * SPEED


def pytest_configure(config):
    global SPEED, _OFFSET
    SPEED, _OFFSET = _procs.speed_factor(), _procs.clock_offset()


def pytest_report_header(config):
    return f"machine speed factor {SPEED:.2f} (ceilings and per-test timeouts scale by it)"


def pytest_collection_modifyitems(config, items):
    """A per-test ceiling (pytest-timeout), scaled like every other: a hung test fails by its
    own name, long before CI's limit. A test may ask for more with @pytest.mark.timeout(N)."""
    for item in items:
        mark = item.get_closest_marker("timeout")
        base = mark.args[0] if mark and mark.args else config.getini("timeout") or 600
        item.add_marker(pytest.mark.timeout(ceiling(float(base))), append=False)


def pytest_runtest_setup(item):
    _started.append((time.time() + _OFFSET, item.nodeid))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Nothing outlives the suite: a process still alive with this session's marker, once
    every fixture is torn down, fails the run, named with the test that was running when it
    started; it is killed."""
    deadline = time.monotonic() + 15  # a process told to stop may still be on its way out
    while (left := _procs.marked(SESSION)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    lines = []
    for p in left:
        try:
            born = p.create_time()
        except Exception:
            born = 0.0
        test = next((t for at, t in reversed(_started) if at <= born), "before the first test")
        lines.append(f"  {_procs.describe(p)}\n    started during {test}")
    _procs.kill_all(left)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"LEFTOVER PROCESSES: {len(left)} still alive after the suite "
                      "(killed now):", red=True)
        for line in lines:
            tr.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

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
    from tasks.models.tiny import make_tiny_model

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
