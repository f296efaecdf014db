"""Hostile input (#16): values that MLflow's filter grammar cannot take as they are, stores
larger than one page, and run ids the store does not hold."""
from __future__ import annotations

import html
import json
import logging
import sys

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from tasks.common import names
from tasks.tracking import store

runner = CliRunner()
AWKWARD = ["o'brien's nightly", 'the "best" one', "both ' and \"", "back\\slash", "100%_done",
           "ünï cödé", "'\"", "semi; drop table runs; --"]


@pytest.fixture(autouse=True)
def _reopen_log_streams():
    """As in test_cli.py: CliRunner closes the stderr buffer that Prefect's handler keeps."""
    yield
    for lg in [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger)]:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                h.stream = sys.__stderr__
            console = getattr(h, "console", None)
            if console is not None and getattr(console.file, "closed", False):
                console.file = sys.__stderr__


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path}/m.db")


def test_every_value_is_found_exactly(client):
    """Each awkward value finds its own run and no other (prefixes and LIKE wildcards too)."""
    eid = client.create_experiment("x")
    ids = {v: client.create_run(eid, tags={"t": v}).info.run_id for v in AWKWARD}
    decoys = ["o'brien", "100%Xdone", "100a_done", "both ' and \"!", "ünï"]
    for v in decoys:
        client.create_run(eid, tags={"t": v})
    for v in AWKWARD:
        found = [r.info.run_id for r in store.search(client, eid, store.Query({"t": v}))]
        assert found == [ids[v]], v


def test_search_pages_to_the_end(client, monkeypatch):
    monkeypatch.setattr(store, "PAGE", 3)  # 3 runs a page: 11 runs take 4 pages
    eid = client.create_experiment("x")
    made = [client.create_run(eid, tags={"t": "a"}, start_time=1000 + i).info.run_id
            for i in range(11)]
    client.create_run(eid, tags={"t": "b"})
    assert [r.info.run_id for r in store.search(client, eid, store.Query({"t": "a"}))] == made
    newest = store.search(client, eid, store.Query({"t": "a"}), store.NEWEST, limit=5)
    assert [r.info.run_id for r in newest] == made[::-1][:5]
    for run_id in made[:7]:
        client.set_terminated(run_id, "FINISHED")
    assert len(store.running(client, eid, {"t": "a"})) == 4


@pytest.mark.parametrize("bad", ["0123456789abcdef0123456789abcdef", "../etc/passwd", "a b"])
def test_get_run_names_the_id_and_the_store(client, bad):
    client.create_experiment("x")
    with pytest.raises(store.UnknownRun) as e:
        store.get_run(client, bad, "parent run")
    assert repr(bad) in str(e.value)
    if bad.isalnum():
        assert "m.db" in str(e.value)


def test_a_quoted_benchmark_name_runs_twice_with_its_history(prefect_harness, bench_config,
                                                              tmp_path):
    """The name of issue #16, with both quote kinds: both runs finish, the second one's
    regression check finds the first as its baseline, and the report shows the name."""
    name = 'o\'brien\'s "nightly" – ünï'
    cfg = {**bench_config, "name": name,
           "methods": [m for m in bench_config["methods"] if m["name"] in ("full", "lora")]}
    cfg["training"] = {**cfg["training"], "max_steps": 2, "eval_every": None}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    uri = cfg["tracking"]["tracking_uri"]
    parents = []
    for _ in range(2):
        result = runner.invoke(app, ["run", str(path)])
        assert result.exit_code == 0, result.output
        client = MlflowClient(uri)
        eid = store.experiment_id(client, "ci")
        parents = store.parents(client, eid, benchmark=name)
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    newest, first = parents
    check = json.loads(newest.data.tags[names.REGRESSIONS])
    assert check["baselines"] == [first.info.run_id]
    page = (tmp_path / "reports" / newest.info.run_id / "report.html").read_text(encoding="utf-8")
    assert name in html.unescape(page)  # shown as written (Jinja escapes the quotes)
    out = runner.invoke(app, ["compare", "--tracking-uri", uri, "--experiment", "ci"])
    assert out.exit_code == 0 and newest.info.run_id in out.output, out.output


def test_unreadable_names_are_refused_up_front(bench_config, tmp_path):
    for bad, why in (("tab\there", "control character"), (" padded", "white space")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**bench_config, "name": bad}))
        out = runner.invoke(app, ["run", str(path)])
        assert out.exit_code == 2 and "name" in out.output and why in out.output, out.output


def test_unknown_run_ids_exit_2_with_one_line(bench_config, tmp_path, monkeypatch):
    uri = bench_config["tracking"]["tracking_uri"]
    MlflowClient(uri).create_experiment("ci")
    monkeypatch.chdir(tmp_path)  # no mlflow.yaml here: --resume reads the env
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    known = MlflowClient(uri).create_run(store.experiment_id(MlflowClient(uri), "ci"))
    for bad in ("0123456789abcdef0123456789abcdef", "not/an-id"):
        commands = [["report", bad, "--tracking-uri", uri, "--out", str(tmp_path / "r")],
                    ["export", bad, str(tmp_path / "e"), "--tracking-uri", uri],
                    ["promote", bad, "--name", "m", "--tracking-uri", uri],
                    ["compare", "--parent", bad, "--tracking-uri", uri],
                    ["compare", "--parent", known.info.run_id, "--baseline", bad,
                     "--tracking-uri", uri],
                    ["run", "--resume", bad]]
        for args in commands:
            out = runner.invoke(app, args)
            lines = [x for x in out.output.splitlines() if x.strip()]
            assert out.exit_code == 2, (args, out.output)
            assert len(lines) == 1 and lines[0].startswith("error:") and bad in lines[0], \
                (args, out.output)
            assert "Traceback" not in out.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()
