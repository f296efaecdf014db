"""Sweeps that stop early: `sweep.strategy: halving` prunes a hopeless point and keeps the best,
an interrupted halving sweep resumes without retraining its finished points, `tpe` samples
within its ranges and reaches the finals, and bad strategy settings are refused by name.

End to end under a real Prefect test server, a real MLflow sqlite store and the real Optuna
storage; the oracles are MLflow read back through its own client and the Optuna study read
back through Optuna's own `load_study`."""
from __future__ import annotations

import json
import math
import subprocess
import time

import optuna
import pytest
import yaml
from conftest import ROOT, ceiling, make_bench_config
from mlflow import MlflowClient
from test_faults import _cli, _cli_env

from flows.benchmark import benchmark
from tasks.config.build import build_config
from tasks.config.schema import ConfigError

LORA = {"name": "lora", "method": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn"]}
GOOD, HOPELESS = 3e-3, 1e-9  # lr: one that learns in a few steps, one that cannot move at all


def _base(**sweep) -> dict:
    return {"methods": [LORA], "training": {"eval_every": 2}, "sweep": sweep}


@pytest.mark.parametrize("sweep,training,message", [
    ({"strategy": "random"}, {}, "sweep.strategy: Input should be 'grid', 'halving' or 'tpe'"),
    ({"strategy": "halving", "grid": {"lr": [1e-3, 1e-2]}}, {"eval_every": None},
     "sweep.strategy: halving needs training.eval_every"),
    ({"grid": {"lr": {"log_uniform": [1e-5, 1e-2]}}}, {},
     "is a range; only sweep.strategy: tpe samples ranges (grid sweeps a list"),
    ({"strategy": "halving", "grid": {"lr": {"log_uniform": [1e-5, 1e-2]}}}, {},
     "only sweep.strategy: tpe samples ranges (halving sweeps a list"),
    ({"strategy": "tpe", "n_trials": 0, "grid": {"lr": [1e-3]}}, {},
     "sweep.n_trials: Input should be greater than 0"),
    ({"strategy": "tpe", "grid": {"lr": [1e-3]}}, {}, "sweep.n_trials: sweep.strategy: tpe needs it"),
    ({"n_trials": 3, "grid": {"lr": [1e-3]}}, {}, "sweep.n_trials: only for sweep.strategy: tpe"),
    ({"strategy": "tpe", "n_trials": 2, "grid": {"lr": {"log_uniform": [0, 1]}}}, {},
     "sweep.grid.lr.log_uniform: low must be > 0"),
    ({"strategy": "tpe", "n_trials": 2, "grid": {"lr": {"log_uniform": [1e-2, 1e-5]}}}, {},
     "sweep.grid.lr.log_uniform: give [low, high] numbers with low < high"),
    ({"strategy": "tpe", "n_trials": 2, "grid": {"lr": {"normal": [0, 1]}}}, {},
     "sweep.grid.lr: a range is one of {uniform, log_uniform, int: [low, high]}"),
    ({"strategy": "tpe", "n_trials": 2, "grid": {"dropout": {"uniform": [0.0, 1.5]}}}, {},
     "sweep range end {'dropout': 1.5} of lora: dropout: Input should be less than 1"),
])
def test_bad_strategy_settings_are_refused_by_name(sweep, training, message):
    raw = _base(**sweep)
    raw["training"].update(training)
    with pytest.raises(ConfigError) as err:
        build_config(raw, mlflow_yaml=None)
    assert message in str(err.value)


def test_tpe_counts_n_trials_per_method_and_halving_every_point():
    tpe = build_config(_base(strategy="tpe", n_trials=5, max_runs=10,
                             grid={"lr": {"log_uniform": [1e-5, 1e-2]}}), mlflow_yaml=None)
    assert len(tpe.grid_jobs()) == 5
    halving = build_config(_base(strategy="halving", grid={"lr": [1e-4, 1e-3], "rank": [4, 8]}),
                           mlflow_yaml=None)
    assert len(halving.grid_jobs()) == 4


def test_a_pruned_point_is_never_chosen_over_one_that_finished(tmp_path):
    """Plant a pruned run whose (partial) score is the best: the finished one is chosen; with
    no other run finished, the pruned one is."""
    from flows.orchestration.sweeping import choose

    cfg = build_config(_base(strategy="halving", grid={"lr": [1e-4, 1e-3]}), mlflow_yaml=None)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("x")
    runs = []
    for lr, accuracy, pruned in ((1e-4, 0.9, True), (1e-3, 0.7, False)):
        tags = {"peft_bench.point_json": json.dumps({"lr": lr})}
        if pruned:
            tags["peft_bench.pruned_at_step"] = "2"
        r = client.create_run(exp, tags=tags)
        client.log_metric(r.info.run_id, "eval/accuracy", accuracy)
        client.set_terminated(r.info.run_id, "FINISHED")
        runs.append(client.get_run(r.info.run_id))
    assert json.loads(choose(cfg, runs).data.tags["peft_bench.point_json"]) == {"lr": 1e-3}
    assert choose(cfg, runs[:1]).info.run_id == runs[0].info.run_id


# ------------------------------------------------------------------ end to end
def _config(tmp_path, tiny_model_dir, sst2_dir, sweep: dict, **training) -> dict:
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["name"] = "early-stop"
    cfg["methods"] = [dict(LORA)]
    cfg["data"].update(test_split="test", test_size=48)
    cfg["training"].update({"seeds": [1, 2], "max_steps": 16, "eval_every": 4, "num_threads": 1,
                            "checkpoint_dir": str(tmp_path / "ckpt"), **training})
    cfg["tracking"]["artifact_location"] = str(tmp_path / "artifacts")  # not the checkout's mlruns/
    cfg["sweep"] = {"metric": "eval_loss", **sweep}
    return cfg


def _study(cfg, method_run_id: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(
        str(__import__("pathlib").Path(cfg["training"]["checkpoint_dir"]) / "optuna.journal")))
    return optuna.load_study(study_name=f"peft-bench-{method_run_id}", storage=storage)


def _grid_runs(client: MlflowClient, parent_run_id: str) -> tuple[str, list]:
    """(the method's run id, its grid runs) of a one-method sweep."""
    parent = client.get_run(parent_run_id)
    eid = parent.info.experiment_id
    method = client.search_runs([eid], f"tags.`peft_bench.benchmark_run` = '{parent_run_id}'")
    assert len(method) == 1
    rid = method[0].info.run_id
    return rid, client.search_runs([eid], f"tags.mlflow.parentRunId = '{rid}'", max_results=100)


def test_halving_stops_a_hopeless_point_early_and_keeps_the_best(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    cfg = _config(tmp_path, tiny_model_dir, sst2_dir,
                  {"strategy": "halving", "grid": {"lr": [GOOD, HOPELESS]}, "seed": 1,
                   "min_resource": 4, "reduction_factor": 3})
    result = benchmark(config=cfg)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    method_run, grid = _grid_runs(client, result["parent_run_id"])
    by_lr = {json.loads(r.data.tags["peft_bench.point_json"])["lr"]: r for r in grid}
    assert sorted(by_lr) == sorted([GOOD, HOPELESS])
    study = _study(cfg, method_run)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    # The precondition of the planted case: sweep.seed 1 has Optuna's GridSampler visit the
    # good point first, so the hopeless one races against it.
    assert [json.loads(t.user_attrs["point"])["lr"] for t in trials] == [GOOD, HOPELESS]
    good, bad = by_lr[GOOD], by_lr[HOPELESS]
    assert bad.info.status == "FINISHED"
    pruned_at = int(bad.data.tags["peft_bench.pruned_at_step"])
    assert pruned_at == 4 and bad.data.metrics["train_steps"] == pruned_at < 16
    curve = client.get_metric_history(bad.info.run_id, "eval/loss")
    assert curve and max(m.step for m in curve) == pruned_at  # its partial curve stays
    assert bad.data.tags["peft_bench.run_key"].endswith(":pruned")  # never reused as a full run
    assert "peft_bench.pruned_at_step" not in good.data.tags
    assert good.data.metrics["train_steps"] == 16
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED]
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == [good.info.run_id, bad.info.run_id]
    assert math.isclose(trials[0].value, good.data.metrics["eval/loss"])
    assert good.data.tags["peft_bench.chosen"] == "true" and bad.data.tags["peft_bench.chosen"] == "false"
    finals = client.search_runs([good.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(finals) == 2 and {r.info.status for r in finals} == {"FINISHED"}
    assert {json.loads(r.data.tags["peft_bench.point_json"])["lr"] for r in finals} == {GOOD}
    assert {r.data.tags["peft_bench.eval_split"] for r in finals} == {"test"}


def test_tpe_samples_within_its_ranges_and_reaches_the_finals(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    cfg = _config(tmp_path, tiny_model_dir, sst2_dir,
                  {"strategy": "tpe", "n_trials": 3, "seed": 7,
                   "grid": {"lr": {"log_uniform": [1e-4, 1e-2]}, "rank": [2, 4]}},
                  max_steps=4, eval_every=2)
    result = benchmark(config=cfg)
    assert result["failed"] == []
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    method_run, grid = _grid_runs(client, result["parent_run_id"])
    points = [json.loads(r.data.tags["peft_bench.point_json"]) for r in grid]
    assert len(grid) == 3 and {r.info.status for r in grid} == {"FINISHED"}
    assert all(1e-4 <= p["lr"] <= 1e-2 and p["rank"] in (2, 4) for p in points), points
    assert len({p["lr"] for p in points}) == 3  # sampled, not one value thrice
    assert all(float(p["lr"]) == float(f"{p['lr']:.3g}") for p in points)  # 3 significant digits
    trials = _study(cfg, method_run).get_trials()
    assert len(trials) == 3 and {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in grid}
    best = min(grid, key=lambda r: r.data.metrics["eval/loss"])  # the metric: eval_loss
    assert best.data.tags["peft_bench.chosen"] == "true"
    finals = client.search_runs([best.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(finals) == 2 and {r.info.status for r in finals} == {"FINISHED"}
    assert {r.data.tags["peft_bench.point_json"] for r in finals} == {best.data.tags["peft_bench.point_json"]}


def _started(client: MlflowClient, experiment: str, n: int) -> bool:
    """The event the kill waits for: `n` grid runs exist and the first of them FINISHED."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return False
    grid = client.search_runs([exp.experiment_id], "tags.`peft_bench.role` = 'grid'",
                              order_by=["attributes.start_time ASC"])
    return len(grid) >= n and grid[0].info.status == "FINISHED"


def test_an_interrupted_halving_sweep_resumes_without_retraining_finished_points(
        prefect_harness, tmp_path, tiny_model_dir, sst2_dir):
    cfg = _config(tmp_path, tiny_model_dir, sst2_dir,
                  {"strategy": "halving", "grid": {"lr": [GOOD, 1e-3, HOPELESS]}, "seed": 1},
                  max_steps=60, eval_every=4, checkpoint_every=4)
    cfg["training"]["seeds"] = [1]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    uri, env = cfg["tracking"]["tracking_uri"], _cli_env(tmp_path)
    client = MlflowClient(uri)
    proc = subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the real fault: SIGKILL once the first point finished and the second trains
        deadline = time.monotonic() + ceiling(240)
        while not _started(client, "ci", 2) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert _started(client, "ci", 2)
    parent = client.search_runs([client.get_experiment_by_name("ci").experiment_id],
                                "tags.`peft_bench.role` = 'parent'")[0]
    method_run, before = _grid_runs(client, parent.info.run_id)
    first = next(r for r in before if r.info.status == "FINISHED")
    assert len([r for r in before if r.info.status == "FINISHED"]) < 3  # work was left to do
    assert len(_study(cfg, method_run).get_trials()) == 3  # every point's trial asked up front

    out = subprocess.run(_cli("run", "--resume", parent.info.run_id, "--set",
                              f"tracking.tracking_uri={uri}", "--set", "tracking.experiment=ci"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=ceiling(600))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again, after = _grid_runs(client, parent.info.run_id)
    assert again == method_run
    points = [r.data.tags["peft_bench.point"] for r in after]
    assert sorted(points) == sorted(set(points)) and len(points) == 3  # one run per point
    kept = next(r for r in after if r.info.run_id == first.info.run_id)  # the same run, untouched
    assert kept.info.end_time == first.info.end_time and kept.data.metrics == first.data.metrics
    assert "peft_bench.resumed_from_step" not in kept.data.tags
    assert "left alone" in out.stdout and first.info.run_id in out.stdout
    assert {r.info.status for r in after} == {"FINISHED"}
    trials = _study(cfg, method_run).get_trials()
    assert len(trials) == 3  # no point asked twice
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in trials)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in after}


def test_plan_bounds_the_halving_budget(tmp_path, bench_config):
    """3 points of 16 steps, rungs at 4 and 12, the top 1/3 on: by hand over the 6 orders of
    ranks (best = 2): [2,1,0] and [2,0,1] cost 16+4+4 = 24; [1,2,0], [1,0,2] and [0,2,1] cost
    16+16+4 = 36; [0,1,2] costs 48. So at most 48, at least 24, expected 204/6 = 34."""
    from typer.testing import CliRunner

    from flows.cli.main import app

    cfg = {**bench_config, "methods": [LORA],
           "sweep": {"strategy": "halving", "grid": {"lr": [1e-4, 1e-3, 1e-2]}, "min_resource": 4}}
    cfg["training"].update(max_steps=16, eval_every=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    out = CliRunner().invoke(app, ["plan", str(tmp_path / "s.yaml")])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "lora: 3 points x 16 steps = 48 as a grid; rungs at [4, 12]: at most 48, at least 24" in text
    expected = float(text.split("at least 24, about ")[1].split(" ")[0])
    assert abs(expected - 34) <= 1, text
