"""Sweeps: the grid as written, `plan` without training, selection on the selection split
only, the held-out test split, and reuse of finished runs. End to end under a real Prefect test
server and MLflow store where it matters."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_bench_config
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.benchmark import benchmark
from flows.cli.main import app
from tasks.config.build import build_config
from tasks.config.schema import ConfigError
from tasks.data.dataset import load_splits, validate_data
from tasks.data.labels import DataError

runner = CliRunner()
LORA = {"name": "lora", "method": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn"]}


def _cfg(**extra) -> dict:
    return {"methods": [{"name": "full", "method": "full"}, LORA], **extra}


def test_grid_is_the_product_with_method_overrides():
    cfg = build_config(_cfg(sweep={"grid": {"lr": [1e-4, 1e-3], "rank": [4, 8]}},
                            training={"seeds": [1, 2, 3]}), mlflow_yaml=None)
    jobs = cfg.grid_jobs()
    # full fine-tuning has no rank: the default grid's rank is dropped for it
    assert [p for m, p in jobs if m == "full"] == [{"lr": 1e-4}, {"lr": 1e-3}]
    assert [p for m, p in jobs if m == "lora"] == [
        {"lr": 1e-4, "rank": 4}, {"lr": 1e-4, "rank": 8}, {"lr": 1e-3, "rank": 4},
        {"lr": 1e-3, "rank": 8}]
    own = build_config(_cfg(sweep={"grid": {"lr": [1e-4, 1e-3]}}) | {
        "methods": [{"name": "full", "method": "full", "sweep": {"lr": [1e-5]}},
                    {**LORA, "sweep": {"alpha": [8, 16]}}]}, mlflow_yaml=None)
    assert [p for m, p in own.grid_jobs() if m == "full"] == [{"lr": 1e-5}]  # its own wins
    assert [p for m, p in own.grid_jobs() if m == "lora"] == [  # merged key by key
        {"lr": 1e-4, "alpha": 8}, {"lr": 1e-4, "alpha": 16}, {"lr": 1e-3, "alpha": 8},
        {"lr": 1e-3, "alpha": 16}]
    point = own.with_point("lora", {"lr": 1e-3, "alpha": 16, "weight_decay": 0.1})
    assert point.methods[1].lr == 1e-3 and point.methods[1].alpha == 16
    assert point.training.weight_decay == 0.1 and point.methods[0] == own.methods[0]


@pytest.mark.parametrize("raw,message", [
    (_cfg(sweep={"grid": {"lr": [1e-4], "rank": list(range(1, 40))}, "max_runs": 30}),
     "sweep: 42 runs (grid points + finals) exceed sweep.max_runs = 30"),
    (_cfg(sweep={"grid": {"learning_rate": [1e-4]}}), "cannot sweep ['learning_rate']"),
    (_cfg(sweep={"grid": {"lr": []}}), "sweep.grid.lr: give a non-empty list"),
    (_cfg(sweep={"grid": {"rank": [4, -1]}}), "sweep point {'rank': -1} of lora: rank: Input should be greater than 0"),
    ({"methods": [{"name": "full", "method": "full", "sweep": {"rank": [4]}}], "sweep": {}},
     "do not apply to full fine-tuning"),
    ({"methods": [{**LORA, "sweep": {"lr": [1e-3]}}]}, "has a sweep: grid but the config has no sweep:"),
])
def test_bad_sweeps_are_refused(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw, mlflow_yaml=None)
    assert message in str(err.value)


def test_plan_prints_the_runs_and_trains_nothing(tmp_path, bench_config):
    cfg = {**bench_config, "sweep": {"grid": {"lr": [1e-4, 1e-3, 1e-2]}}}
    cfg["training"]["seeds"] = [1, 2]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    out = runner.invoke(app, ["plan", str(tmp_path / "s.yaml"), "--workers", "3"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "12 grid runs (first seed, scored on validation) + 8 final runs (4 methods x 2 seeds" in text
    assert "= 20 runs (sweep.max_runs 100)" in text and "no estimate yet" in text
    db = bench_config["tracking"]["tracking_uri"].removeprefix("sqlite:///")
    assert not (tmp_path / db).exists() and not __import__("os").path.exists(db)


def _write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))


def test_hidden_test_labels_are_refused_with_the_fix(tmp_path):
    from tasks.config.schema import DataConfig

    rows = [(f"text {i}", i % 2) for i in range(20)]
    _write(tmp_path, "train", rows)
    _write(tmp_path, "validation", rows)
    _write(tmp_path, "test", [(f"unseen {i}", -1) for i in range(10)])
    with pytest.raises(DataError) as err:
        validate_data(DataConfig(source=str(tmp_path), test_split="test"))
    assert "test.tsv: every label is -1" in str(err.value)
    assert "set data.test_from_train: 0.1" in str(err.value)
    carved = DataConfig(source=str(tmp_path), test_from_train=0.25, seed=3)
    splits = load_splits(carved)
    train, test = splits["train"], splits["test-from-train"]
    assert len(test) == 5 and not set(train.index) & set(test.index)  # disjoint
    assert load_splits(carved)["test-from-train"].index.equals(test.index)  # seeded
    assert not load_splits(carved.model_copy(update={"seed": 4}))["test-from-train"].index.equals(test.index)


def test_selection_reads_the_selection_split_only(tmp_path):
    """Plant a grid point that would be best on test but is worse on validation."""
    from flows.orchestration.sweeping import choose

    cfg = build_config(_cfg(sweep={"grid": {"lr": [1e-4, 1e-3, 1e-2]}}), mlflow_yaml=None)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("x")
    runs = []
    for lr, selection, test in ((1e-4, 0.70, 0.95), (1e-3, 0.80, 0.60), (1e-2, 0.75, 0.90)):
        r = client.create_run(exp, tags={"peft_bench.point_json": json.dumps({"lr": lr})})
        client.log_metric(r.info.run_id, "eval/accuracy", selection)
        client.log_metric(r.info.run_id, "test/accuracy", test)  # as if it had leaked
        client.set_terminated(r.info.run_id, "FINISHED")
        runs.append(client.get_run(r.info.run_id))
    assert json.loads(choose(cfg, runs).data.tags["peft_bench.point_json"]) == {"lr": 1e-3}
    loss = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"metric": "eval_loss"})})
    for r, value in zip(runs, (0.3, 0.5, 0.2)):
        client.log_metric(r.info.run_id, "eval/loss", value)
    runs = [client.get_run(r.info.run_id) for r in runs]
    assert json.loads(choose(loss, runs).data.tags["peft_bench.point_json"]) == {"lr": 1e-2}


# ------------------------------------------------------------------ end to end
def _sweep_config(tmp_path, tiny_model_dir, sst2_dir, grid) -> dict:
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["name"] = "sweep"
    cfg["methods"] = [cfg["methods"][0], cfg["methods"][1]]
    cfg["data"].update(test_split="test", test_size=64)
    cfg["training"].update(seeds=[1, 2], eval_every=None)
    cfg["sweep"] = {"grid": {"lr": grid}}
    return cfg


def _runs(cfg, where):
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    return client.search_runs([exp.experiment_id], where, max_results=1000)


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    cfg = _sweep_config(tmp_path_factory.mktemp("sweep"), tiny_model_dir, sst2_dir, [1e-4, 3e-3])
    return cfg, benchmark(config=cfg)


def test_grid_runs_on_validation_finals_on_test(swept):
    cfg, result = swept
    grid = _runs(cfg, "tags.`peft_bench.role` = 'grid'")
    assert sorted((r.data.tags["peft_bench.method"], r.data.tags["peft_bench.point"]) for r in grid) == [
        ("full", "lr=0.0001"), ("full", "lr=0.003"), ("lora", "lr=0.0001"), ("lora", "lr=0.003")]
    assert {r.data.tags["peft_bench.eval_split"] for r in grid} == {"validation"}
    assert {r.data.tags["peft_bench.seed"] for r in grid} == {"1"}  # the first seed only
    finals = _runs(cfg, f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(finals) == 4 and {r.data.tags["peft_bench.eval_split"] for r in finals} == {"test"}
    for method in ("full", "lora"):
        mine = [r for r in grid if r.data.tags["peft_bench.method"] == method]
        best = max(mine, key=lambda r: r.data.metrics["eval/accuracy"])  # first of equals wins
        best = next(r for r in sorted(mine, key=lambda r: r.data.tags["peft_bench.point"] != "lr=0.0001")
                    if r.data.metrics["eval/accuracy"] == best.data.metrics["eval/accuracy"])
        assert [r.data.tags["peft_bench.chosen"] for r in mine].count("true") == 1
        assert best.data.tags["peft_bench.chosen"] == "true", method
        point = best.data.tags["peft_bench.point"]
        assert {r.data.tags["peft_bench.point"] for r in finals
                if r.data.tags["peft_bench.method"] == method} == {point}
        parent = best.data.tags["mlflow.parentRunId"]  # the method's run, tagged with the choice
        assert MlflowClient(cfg["tracking"]["tracking_uri"]).get_run(parent).data.tags[
            "peft_bench.chosen_point"] == best.data.tags["peft_bench.point_json"]


def test_an_identical_rerun_trains_nothing_and_a_new_point_only_itself(swept, tmp_path):
    cfg, first = swept
    again = benchmark(config=cfg)
    runs = _runs(cfg, f"tags.mlflow.parentRunId = '{again['parent_run_id']}'")
    assert len(runs) == 4 and all("peft_bench.reused_from" in r.data.tags for r in runs)
    before = json.loads(open(first["report_html"].replace("report.html", "summary.json")).read())
    after = json.loads(open(again["report_html"].replace("report.html", "summary.json")).read())
    for a, b in zip(before["methods"], after["methods"]):
        for key in ("accuracy", "f1_macro", "eval_loss", "train_time_s", "peak_memory_mb"):
            assert a[key] == b[key], key  # the same report
    changed = {**cfg, "sweep": {"grid": {"lr": [1e-4, 1e-2]}}}
    third = benchmark(config=changed)
    grid = [r for r in _runs(cfg, "tags.`peft_bench.role` = 'grid'")
            if r.data.tags.get("peft_bench.point") in ("lr=0.0001", "lr=0.01")
            and r.info.start_time >= MlflowClient(cfg["tracking"]["tracking_uri"]).get_run(
                third["parent_run_id"]).info.start_time]
    trained = sorted((r.data.tags["peft_bench.method"], r.data.tags["peft_bench.point"])
                     for r in grid if "peft_bench.reused_from" not in r.data.tags)
    assert trained == [("full", "lr=0.01"), ("lora", "lr=0.01")]
