"""The report of a sweep, read from a real MLflow sqlite store built here with the pipeline's
schema: a parent run, one run per method (role aggregate) holding its grid runs (role grid,
scored on the selection split), and final child runs per seed (scored on the test split).
Every expectation is computed here from the numbers planted in the store, with literal metric
and tag names, numpy and scipy: never with the report's own functions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_report as plain
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from scipy import stats as st

from tasks.analysis.aggregate import GridPoint
from tasks.report import generate_report
from tasks.reporting.charts_sweep import sensitivity_chart

EXPERIMENT = "peft-bench-sweep-test"
SEEDS = (1, 2)
N_EVAL = 120
LABELS = np.random.default_rng(1).integers(0, 2, N_EVAL)
# method -> (kind, final accuracy per seed, train time per seed, peak MB per seed, params).
# dora is slower, hungrier and less accurate than lora: it must never be a budget answer.
FINALS = {
    "full": ("full", (0.915, 0.917), (412.0, 418.0), (3010.0, 3022.0), 124_441_346),
    "lora": ("lora", (0.902, 0.900), (201.9, 205.3), (1210.0, 1214.0), 812_546),
    "dora": ("dora", (0.890, 0.892), (260.0, 262.0), (1290.0, 1295.0), 889_346),
    "qlora": ("qlora", (0.881, 0.884), (333.3, 329.8), (620.0, 625.0), 812_546),
}
# method -> grid points: (point, selection accuracy, time, peak MB, params, status, reused)
GRIDS = {
    "full": [({"lr": 3e-4}, 0.905, 410.0, 3005.0, 124_441_346, "FINISHED", False),
             ({"lr": 1e-3}, 0.871, 409.0, 3007.0, 124_441_346, "FINISHED", False)],
    "lora": [({"lr": 1e-3, "rank": 4}, 0.880, 198.0, 1190.0, 406_273, "FINISHED", False),
             ({"lr": 1e-3, "rank": 8}, 0.889, 203.0, 1211.0, 812_546, "FINISHED", True),
             ({"lr": 3e-3, "rank": 4}, 0.897, 199.0, 1192.0, 406_273, "FINISHED", False),
             ({"lr": 3e-3, "rank": 8}, None, None, None, None, "FAILED", False)],
    "dora": [({}, 0.884, 259.0, 1288.0, 889_346, "FINISHED", False)],
    "qlora": [({"lr": 1e-3}, 0.866, 331.0, 621.0, 812_546, "FINISHED", False),
              ({"lr": 3e-3}, 0.874, 335.0, 622.0, 812_546, "FINISHED", False)],
}
REUSED_FINAL = ("lora", 2)


def label(point: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in point.items()) or "default"


def chosen(method: str) -> int:
    """Index of the grid point with the best selection accuracy (finished points only)."""
    scores = [(acc if status == "FINISHED" else -1.0) for _, acc, *_, status, _ in GRIDS[method]]
    return int(np.argmax(scores))


def _grid_runs(client, exp, parent, name, kind, split):
    method_run = client.create_run(exp, run_name=f"{name} [sweep]", tags={
        "peft_bench.role": "aggregate", "peft_bench.method": name,
        "peft_bench.method_kind": kind, "peft_bench.benchmark_run": parent}).info.run_id
    best = chosen(name)
    for i, (point, acc, t, mem, params, status, reused) in enumerate(GRIDS[name]):
        tags = {"mlflow.parentRunId": method_run, "peft_bench.role": "grid",
                "peft_bench.method": name, "peft_bench.method_kind": kind,
                "peft_bench.seed": "1", "peft_bench.point": label(point),
                "peft_bench.point_json": json.dumps(point), "peft_bench.eval_split": split,
                "peft_bench.chosen": str(i == best).lower()}
        if reused:
            tags["peft_bench.reused_from"] = "0123456789abcdef" * 2
        run = client.create_run(exp, run_name=f"{name}-{label(point)}", tags=tags).info.run_id
        if status == "FINISHED":
            client.log_batch(run, metrics=[
                Metric("eval/accuracy", acc, 0, 8), Metric("train_time_s", t, 0, 8),
                Metric("peak_memory_mb", mem, 0, 8), Metric("trainable_params", params, 0, 8)])
        client.set_terminated(run, status)
    client.set_tag(method_run, "peft_bench.chosen_point",
                   json.dumps(GRIDS[name][best][0]))
    client.set_terminated(method_run, "FINISHED")


def _final_run(client, exp, parent, root, name, seed, split):
    kind, accs, times, mems, params = FINALS[name]
    i = SEEDS.index(seed)
    tags = {"mlflow.parentRunId": parent, "peft_bench.role": "child", "peft_bench.method": name,
            "peft_bench.method_kind": kind, "peft_bench.seed": str(seed),
            "peft_bench.eval_split": split}
    if (name, seed) == REUSED_FINAL:
        tags["peft_bench.reused_from"] = "fedcba9876543210" * 2
    run = client.create_run(exp, run_name=f"{name}-seed{seed}", tags=tags).info.run_id
    client.log_batch(run, metrics=[
        Metric("eval/accuracy", accs[i], 0, 8), Metric("eval/loss", 0.4, 0, 8),
        Metric("train/loss", 0.5, 0, 1), Metric("train_time_s", times[i], 0, 8),
        Metric("peak_memory_mb", mems[i], 0, 8), Metric("trainable_params", params, 0, 8)])
    right = np.zeros(N_EVAL, bool)
    rng = np.random.default_rng(7 * seed + len(name))
    right[rng.choice(N_EVAL, round(accs[i] * N_EVAL), replace=False)] = True
    csv = root / f"{name}-{seed}" / "predictions.csv"
    csv.parent.mkdir(exist_ok=True)
    pd.DataFrame({"label": LABELS, "prediction": np.where(right, LABELS, 1 - LABELS)}).to_csv(
        csv, index=False)
    client.log_artifact(run, str(csv))
    client.set_terminated(run, "FINISHED")


def build_sweep_store(root: Path, test_split="test", eval_split="validation", final_split=None):
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={
        "peft_bench.role": "parent", "peft_bench.benchmark": "quickstart-sweep",
        "peft_bench.methods": ",".join(FINALS), "peft_bench.reference": "full",
        "peft_bench.random_init": "false"}).info.run_id
    params = {"model.name_or_path": "tiny-gpt2", "data.source": "sst2",
              "data.eval_split": eval_split, "data.test_split": test_split,
              "sweep.metric": "accuracy"}
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    for name, (kind, *_) in FINALS.items():
        _grid_runs(client, exp, parent, name, kind, eval_split)
    for seed in SEEDS:
        for name in FINALS:
            _final_run(client, exp, parent, root, name, seed, final_split or test_split)
    client.set_terminated(parent, "FINISHED")
    return uri, parent


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri, parent = build_sweep_store(root)
    return generate_report(parent, uri, root / "reports")


def _md(result) -> str:
    return result.markdown_path.read_text(encoding="utf-8")


def _html(result) -> str:
    return result.html_path.read_text(encoding="utf-8")


def _summary(result) -> dict:
    return json.loads((result.dir / "summary.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- budget answers

def expected_staircase(acc: dict, cost: dict) -> list[str]:
    """By definition: a method answers some budget when no other method costs no more and is at
    least as accurate; listed by cost."""
    kept = [m for m in acc if not any(cost[o] <= cost[m] and acc[o] >= acc[m]
                                      for o in acc if o != m)]
    return sorted(kept, key=lambda m: cost[m])


def _means(table: dict, index: int) -> dict:
    """Accuracy (index 1): arithmetic means; time and memory: geometric, as they are reported."""
    mean = np.mean if index == 1 else st.gmean
    return {m: float(mean(v[index])) for m, v in table.items()}


def _line(acc, cost, fmt, unit) -> str:
    return "; ".join(f"≥ {fmt.format(cost[m])} {unit} → {m} ({acc[m]:.3f})"
                     for m in expected_staircase(acc, cost))


def test_budget_answers_are_the_staircase(sweep):
    acc, time_s, mem = _means(FINALS, 1), _means(FINALS, 2), _means(FINALS, 3)
    assert expected_staircase(acc, mem) == ["qlora", "lora", "full"]  # the store is as meant
    assert expected_staircase(acc, time_s) == ["lora", "full"]
    memory_line = "**Under a memory budget:** " + _line(acc, mem, "{:,.0f}", "MB")
    time_line = "**Under a time budget:** " + _line(acc, time_s, "{:,.1f}", "s")
    lines = _md(sweep).splitlines()
    assert lines[0].startswith("# peft-bench report")
    assert lines[2] == "- " + memory_line and lines[3] == "- " + time_line  # the first lines
    answers = _summary(sweep)["budget_answers"]
    for key, cost in (("memory", mem), ("time", time_s)):
        steps = answers[key]["steps"]
        assert [s["method"] for s in steps] == expected_staircase(acc, cost)
        for s in steps:
            assert s["budget"] == pytest.approx(cost[s["method"]], rel=1e-12)
            assert s["accuracy"] == pytest.approx(acc[s["method"]], rel=1e-12)
    assert "dora" not in lines[2] + lines[3]  # slower, hungrier and less accurate than lora
    html = _html(sweep)
    budget = html[html.index('id="budget"'):html.index("</section>", html.index('id="budget"'))]
    assert _line(acc, mem, "{:,.0f}", "MB") in budget
    assert _line(acc, time_s, "{:,.1f}", "s") in budget
    assert html.index('id="budget"') < html.index("<h2>Results</h2>")


def test_budget_leaves_contaminated_timing_out(tmp_path):
    """The plain (non-sweep) store: dora-r8 has a contaminated seed."""
    uri, parent = plain.build_store(tmp_path, failed=None)
    result = generate_report(parent, uri, tmp_path / "reports")
    acc, time_s, mem = (_means(plain.METHODS, i) for i in (1, 2, 3))
    tainted = plain.CONTAMINATED[0]
    clean = {m: v for m, v in acc.items() if m != tainted}
    md = _md(result)
    assert "**Under a memory budget:** " + _line(acc, mem, "{:,.0f}", "MB") in md
    assert tainted in _line(acc, mem, "{:,.0f}", "MB")  # it does answer the memory question
    time_line = next(line for line in md.splitlines() if "Under a time budget" in line)
    assert "**Under a time budget:** " + _line(clean, time_s, "{:,.1f}", "s") in time_line
    assert f"Left out: {tainted} (timing contaminated" in time_line
    assert _summary(result)["budget_answers"]["time"]["left_out"] == [tainted]


# ---------------------------------------------------------------- chosen settings and grid

def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after `heading`."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_chosen_settings(sweep):
    rows = {r[0]: r for r in _table(_md(sweep), "## Chosen settings")}
    assert list(rows) == list(FINALS)
    for method, points in GRIDS.items():
        point, acc, *_ = points[chosen(method)]
        _, point_cell, value, count, reused, final = rows[method]
        assert point_cell == label(point) and value == f"{acc:.4f}"
        n_ok = sum(p[5] == "FINISHED" for p in points)
        assert count == f"{len(points)} ({n_ok} finished, {len(points) - n_ok} failed)"
        assert reused == str(sum(p[6] for p in points))
        accs = np.asarray(FINALS[method][1])
        low, high = st.t.interval(0.95, len(accs) - 1, loc=accs.mean(), scale=st.sem(accs))
        low, high = max(0.0, low), min(1.0, high)
        assert final == f"{accs.mean():.4f} ± {(high - low) / 2:.4f} ({len(accs)} seeds)"
    assert rows["lora"][1] == "lr=0.003,rank=4"  # the planted best, not the first point


def test_grid_table_lists_every_point(sweep):
    rows = _table(_md(sweep), "### Grid points")
    assert len(rows) == sum(len(p) for p in GRIDS.values())
    by_key = {(r[0], r[1]): r for r in rows}
    for method, points in GRIDS.items():
        for i, (point, acc, t, mem, params, status, reused) in enumerate(points):
            _, _, status_, value, time_, mem_, _, reused_, star = by_key[(method, label(point))]
            assert status_ == status
            assert value == (f"{acc:.4f}" if acc is not None else "—")
            assert time_ == (f"{t:,.1f}" if t is not None else "—")
            assert mem_ == (f"{mem:,.0f}" if mem is not None else "—")
            assert reused_ == ("yes" if reused else "no")
            assert star == ("★" if i == chosen(method) else "")
    html = _html(sweep)
    grid = html[html.index('id="grid"'):]
    assert grid[:grid.index("</table>")].count('title="chosen">★') == len(GRIDS)


def test_reused_finals_are_noted(sweep):
    method, seed = REUSED_FINAL
    md = _md(sweep)
    assert "1 final run(s) reused from earlier identical runs" in md
    assert f"{method} seed {seed}" in md and 'id="reused"' in _html(sweep)
    assert [(r["method"], r["seed"]) for r in _summary(sweep)["reused_finals"]] == [REUSED_FINAL]


# ---------------------------------------------------------------- splits

def test_splits_in_header_and_no_warning(sweep):
    md = _md(sweep)
    assert "- **Splits:** final runs scored on `test`; settings chosen on `validation`" in md
    assert "optimistic" not in md.lower() and 'id="optimistic"' not in _html(sweep)
    assert _summary(sweep)["splits"]["optimistic"] is None


@pytest.mark.parametrize("test_split, final_split", [("validation", None),  # test = eval
                                                     ("None", "validation")])  # no test split
def test_optimistic_when_test_is_the_selection_split(tmp_path, test_split, final_split):
    uri, parent = build_sweep_store(tmp_path, test_split=test_split, final_split=final_split)
    result = generate_report(parent, uri, tmp_path / "reports")
    md = _md(result)
    warning = next(line for line in md.splitlines() if "optimistic numbers" in line.lower())
    assert md.index(warning) < md.index("## Results") and "(validation)" in warning
    assert 'id="optimistic"' in _html(result)
    assert _summary(result)["splits"]["optimistic"]


def test_method_whose_every_grid_point_failed(tmp_path):
    uri, parent = build_sweep_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    method_run = client.create_run(exp, tags={
        "peft_bench.role": "aggregate", "peft_bench.method": "qdora",
        "peft_bench.method_kind": "qdora", "peft_bench.benchmark_run": parent}).info.run_id
    run = client.create_run(exp, tags={
        "mlflow.parentRunId": method_run, "peft_bench.role": "grid", "peft_bench.method": "qdora",
        "peft_bench.point": "lr=0.001", "peft_bench.point_json": json.dumps({"lr": 1e-3}),
        "peft_bench.chosen": "false", "peft_bench.eval_split": "validation"}).info.run_id
    client.set_terminated(run, "FAILED")
    result = generate_report(parent, uri, tmp_path / "reports")
    rows = {r[0]: r for r in _table(_md(result), "## Chosen settings")}
    assert rows["qdora"][1].startswith("none") and rows["qdora"][2] == "—"
    assert rows["qdora"][3] == "1 (0 finished, 1 failed)" and rows["qdora"][5] == "—"
    assert "sweep_pareto.png" in {p.name for p in result.charts}


@pytest.mark.parametrize("test_split", ["validation", "test"])
def test_optimistic_without_a_sweep(tmp_path, test_split):
    """No grid runs: the parent's params alone say whether test is the selection split."""
    uri, parent = plain.build_store(tmp_path, failed=None, contaminated=None)
    MlflowClient(uri).log_batch(parent, params=[Param("data.eval_split", "validation"),
                                                Param("data.test_split", test_split)])
    result = generate_report(parent, uri, tmp_path / "reports")
    optimistic = test_split == "validation"
    assert ("optimistic numbers" in _md(result).lower()) == optimistic
    assert ('id="optimistic"' in _html(result)) == optimistic


# ---------------------------------------------------------------- charts

PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_charts(sweep):
    by_name = {p.name: p for p in sweep.charts}
    for name in ("sweep_sensitivity.png", "sweep_pareto.png"):
        assert by_name[name].read_bytes()[:8] == PNG
        assert f"]({name})" in _md(sweep)
    html = _html(sweep)
    assert html.count('src="data:image/png;base64,') == len(sweep.charts)
    assert ".png\"" not in html


def test_no_sweep_sections_without_a_sweep(tmp_path):
    uri, parent = plain.build_store(tmp_path, failed=None, contaminated=None)
    result = generate_report(parent, uri, tmp_path / "reports")
    md, names = _md(result), {p.name for p in result.dir.iterdir()}
    assert not {"sweep_sensitivity.png", "sweep_pareto.png"} & names
    assert len(result.charts) == 7
    assert "Chosen settings" not in md and "Grid points" not in md and "Splits" not in md
    assert "sweep" not in " ".join(_summary(result)["notes"]).lower()
    assert _summary(result)["sweep"] is None


def test_sensitivity_without_lr_and_with_nothing_to_draw(tmp_path):
    def gp(method, point, acc, chosen=False):
        return GridPoint("r", method, point, label(point) if point else "default", "FINISHED",
                         chosen, None, {"accuracy": acc})

    grids = {"lora": [gp("lora", {"rank": r}, a, r == 8) for r, a in ((4, 0.8), (8, 0.85))],
             "full": [gp("full", {}, 0.9, True)]}
    colors = {"lora": "#1f77b4", "full": "#ff7f0e"}
    path = sensitivity_chart(grids, "accuracy", "validation", colors, tmp_path / "s.png")
    assert path is not None and path.read_bytes()[:8] == PNG
    only_one = {"full": grids["full"], "lora": grids["lora"][:1]}
    assert sensitivity_chart(only_one, "accuracy", None, colors, tmp_path / "n.png") is None
    assert not (tmp_path / "n.png").exists()
