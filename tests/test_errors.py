"""A failure says what failed: the exception's type and message, or where it was raised when the
message is empty (bitsandbytes' bare asserts), on the console and in `peft_bench.error`; and
the error path itself never raises."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_bench_config
from mlflow.tracking import MlflowClient

from flows.benchmark import AllRunsFailed, benchmark
from tasks.common import names, progress
from tasks.common.errors import describe


def _bare_assert():
    raise AssertionError  # message-less, as bitsandbytes' bare `assert` raises it (pytest
    # rewrites asserts in test files into ones with a message, so it is raised by hand)


def _caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_an_empty_message_names_the_place():
    text = describe(_caught(_bare_assert))
    assert text.startswith("AssertionError (raised at test_errors.py:")
    assert "in _bare_assert, with no message)" in text


def test_a_message_is_kept_and_cut_to_one_line():
    def two_lines():
        raise ValueError("first line\nsecond line")

    e = _caught(two_lines)
    assert describe(e) == "ValueError: first line\nsecond line"
    assert describe(e, one_line=True) == "ValueError: first line"


def test_an_unreadable_message_does_not_raise():
    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert describe(Broken()) == "Broken (its message could not be read)"
    assert describe(AssertionError()).startswith("AssertionError (raised with no traceback")


def test_a_planted_messageless_failure_is_named_on_the_console_and_in_mlflow(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir, monkeypatch, caplog):
    def clip(*args, **kwargs):  # where bitsandbytes' assert struck: inside the training step
        raise AssertionError

    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["methods"] = cfg["methods"][1:2]
    cfg["training"].update(max_steps=2, eval_every=None, max_grad_norm=1.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with caplog.at_level(logging.INFO, logger=progress.LOGGER), \
            pytest.raises(AllRunsFailed, match="lora/seed=42"):
        benchmark(config=cfg)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("ci").experiment_id])
             if r.data.tags.get(names.ROLE) == names.ROLE_CHILD]
    assert run.info.status == "FAILED"
    error = run.data.tags[names.ERROR]
    assert error.startswith("AssertionError (raised at test_errors.py:"), error
    assert "in clip, with no message" in error
    lines = [r.getMessage() for r in caplog.records if "FAILED" in r.getMessage()]
    assert any("lora seed 42: FAILED: AssertionError (raised at test_errors.py:" in m
               for m in lines), lines
