"""The report reads a real MLflow sqlite store (built here with the pipeline's schema: a parent,
child runs per method and seed, predictions artifacts) and must show exactly the numbers MLflow
holds. Every expectation is computed here from what the store holds, with literal metric names,
numpy and scipy: never with the report module's own lists or functions."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from scipy import stats as st

from tasks import report as report_mod
from tasks.report import ReportError, generate_report, latest_parent_run, read_children
from tasks.tracking.store import UnknownRun

EXPERIMENT = "peft-bench-test"
SEEDS = (1, 2, 3)
N_EVAL = 200
# method -> (kind, accuracy per seed, train time per seed, peak MB per seed, trainable params,
#            model MB, adapter MB)
METHODS = {
    "full": ("full", (0.915, 0.920, 0.910), (412.3, 405.1, 418.8), (3010., 3022., 2998.),
             124_441_346, 474.71, None),
    "lora-r8": ("lora", (0.905, 0.902, 0.899), (201.9, 205.3, 199.4), (1210., 1213., 1208.),
                812_546, 474.9, 3.1234),
    "dora-r8": ("dora", (0.908, 0.906, 0.904), (250.1, 255.0, 248.7), (1290., 1288., 1295.),
                889_346, 475.2, 3.41),
    "qlora-r8": ("qlora", (0.880, 0.885, 0.878), (333.3, 329.8, 340.2), (620., 625., 618.),
                 812_546, 127.64, 3.1234),
}
FAILED = ("qdora-r8", "qdora", "RuntimeError: CUDA out of memory | tried to allocate 2.00 GiB")
CONTAMINATED = ("dora-r8", 2, 0.6)  # method, seed, share of the machine other processes took
LABELS = np.random.default_rng(0).integers(0, 2, N_EVAL)
# What the report must read for each summary key: the metric names, spelled out.
METRIC_OF = {"accuracy": "eval/accuracy", "f1_macro": "eval/f1_macro", "eval_loss": "eval/loss",
             "precision": "eval/precision", "recall": "eval/recall",
             "train_time_s": "train_time_s", "step_time_median_s": "step_time_median_s",
             "samples_per_s": "samples_per_s", "tokens_per_s": "tokens_per_s",
             "peak_memory_mb": "peak_memory_mb", "trainable_params": "trainable_params",
             "model_size_mb": "model_size_mb", "adapter_size_mb": "adapter_size_mb"}
# Summarised on the log scale: geometric mean, exp of the t-interval of the logs.
LOG_SCALE = {"train_time_s", "step_time_median_s", "samples_per_s", "tokens_per_s",
             "peak_memory_mb"}


def predictions(method: str, seed: int) -> np.ndarray:
    """Per-example predictions right on about `accuracy` of the rows, different per run."""
    acc = METHODS[method][1][SEEDS.index(seed)]
    rng = np.random.default_rng(abs(hash((method, seed))) % 2**32)
    right = np.zeros(N_EVAL, bool)
    right[rng.choice(N_EVAL, round(acc * N_EVAL), replace=False)] = True
    return np.where(right, LABELS, 1 - LABELS)


def _child_metrics(i, kind, accs, times, mems, trainable, model_mb, adapter_mb, now, share):
    acc, t, mem = accs[i], times[i], mems[i]
    ms = [Metric("train/loss", 0.7 - 0.05 * s + t * 2e-4, now + s, s) for s in range(1, 9)]
    ms += [Metric("train/step_time_s", t / 80 + 0.001 * s, now + s, s) for s in range(1, 9)]
    for j, s in enumerate((3, 6, 8)):  # three evaluations, the last one is the final
        a = acc - 0.02 * (2 - j)
        ms += [Metric("eval/accuracy", a, now + s, s), Metric("eval/loss", 0.5 - a / 3, now + s, s),
               Metric("eval/f1_macro", a - 0.0011, now + s, s),
               Metric("eval/precision", a - 0.002, now + s, s),
               Metric("eval/recall", a + 0.001, now + s, s)]
    single = {"train_time_s": t, "step_time_median_s": t / 80, "eval_time_s": t / 17,
              "samples_per_s": 4096 / t, "tokens_per_s": 4096 * 61.7 / t,
              "eval_samples_per_s": 872 / (t / 17), "peak_memory_mb": mem,
              "trainable_params": trainable, "total_params": 124_441_346,
              "trainable_pct": 100 * trainable / 124_441_346, "model_size_mb": model_mb,
              "train_steps": 8, "other_cpu_share": share}
    if adapter_mb is not None:
        single["adapter_size_mb"] = adapter_mb
    return ms + [Metric(k, float(v), now + 20, 8) for k, v in single.items()]


def _child_tags(parent, name, kind, seed) -> dict:
    return {"mlflow.parentRunId": parent, "peft_bench.role": "child", "peft_bench.method": name,
            "peft_bench.method_kind": kind, "peft_bench.seed": str(seed)}


def build_store(root: Path, random_init="true", methods=METHODS, failed=FAILED,
                contaminated=CONTAMINATED, regressions=None):
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    names = list(methods) + ([failed[0]] if failed else [])
    tags = {"peft_bench.role": "parent", "peft_bench.benchmark": "sst2-small",
            "peft_bench.methods": ",".join(names), "peft_bench.reference": names[0],
            "peft_bench.random_init": random_init, "peft_bench.git_sha": "abc1234def",
            "peft_bench.device": "cpu", "peft_bench.data_digest": "sha256:0f3c9e"}
    if regressions:
        tags["peft_bench.regressions"] = json.dumps(regressions)
    parent = client.create_run(exp, run_name="bench", tags=tags).info.run_id
    params = {"model.name_or_path": "openai-community/gpt2", "data.source": "stanfordnlp/sst2",
              "training.lr": "0.0002", "versions.torch": "2.13.0",
              "versions.transformers": "5.1.0", "versions.peft_bench": "0.1.0"}
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    now = int(time.time() * 1000)
    for i, seed in enumerate(SEEDS):
        for name, (kind, *nums) in methods.items():
            bad = contaminated is not None and contaminated[:2] == (name, seed)
            tags = _child_tags(parent, name, kind, seed)
            if bad:
                tags.update({"peft_bench.timing_contaminated": "true",
                             "peft_bench.timing_warning": f"{name} (seed {seed}): other processes "
                             f"used {100 * contaminated[2]:.0f}% of the machine's CPU"})
            run = client.create_run(exp, run_name=f"{name}-seed{seed}", tags=tags).info.run_id
            share = contaminated[2] if bad else 0.01
            client.log_batch(run, metrics=_child_metrics(i, kind, *nums, now, share))
            csv = root / f"{name}-{seed}" / "predictions.csv"
            csv.parent.mkdir(exist_ok=True)
            pd.DataFrame({"label": LABELS, "prediction": predictions(name, seed)}).to_csv(csv, index=False)
            client.log_artifact(run, str(csv))
            client.set_terminated(run, "FINISHED")
    if failed:
        name, kind, error = failed
        tags = {**_child_tags(parent, name, kind, 1), "peft_bench.error": error}
        run = client.create_run(exp, run_name=name, tags=tags).info.run_id
        client.log_metric(run, "train/loss", 0.69, step=1)
        client.set_terminated(run, "FAILED")
    client.set_terminated(parent, "FINISHED")
    return uri, parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri, parent = build_store(root)
    result = generate_report(parent, uri, root / "reports")
    return uri, parent, root, result


def _summary(result) -> dict:
    return json.loads((result.dir / "summary.json").read_text(encoding="utf-8"))


def _per_seed(client: MlflowClient, uri: str, parent: str) -> dict:
    """method -> seed -> the run's metrics, straight from MLflow."""
    out: dict = {}
    for run in read_children(uri, parent):
        if run.info.status == "FINISHED":
            metrics = client.get_run(run.info.run_id).data.metrics
            out.setdefault(run.data.tags["peft_bench.method"], {})[
                int(run.data.tags["peft_bench.seed"])] = (run.info.run_id, metrics)
    return out


def _t_ci(values, lo=-math.inf, hi=math.inf):
    v = np.asarray(values, float)
    low, high = st.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=st.sem(v))
    return [max(lo, low), min(hi, high)]


def _log_ci(values):
    return [math.exp(b) for b in _t_ci(np.log(values))]


def test_files_exist(bench):
    _, parent, root, result = bench
    assert result.dir == root / "reports" / parent
    for path in (result.markdown_path, result.html_path, result.dir / "summary.json"):
        assert path.is_file() and path.stat().st_size > 0
    assert len(result.charts) == 7
    for chart in result.charts:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (root / "reports").iterdir()] == [parent]  # no temp folder left


def test_summary_equals_mlflow(bench):
    uri, parent, _, result = bench
    per_seed = _per_seed(MlflowClient(uri), uri, parent)
    rows = {m["method"]: m for m in _summary(result)["methods"]}
    assert set(rows) == set(METHODS) | {FAILED[0]}
    for method, seeds in per_seed.items():
        row = rows[method]
        assert row["n_seeds"] == 3 and row["seeds"] == [1, 2, 3]
        for key, metric in METRIC_OF.items():
            values = [m.get(metric) for _, m in seeds.values()]
            if values[0] is None:
                assert row[key] is None, (method, key)
                continue
            mean = st.gmean(values) if key in LOG_SCALE else np.mean(values)
            assert row[key] == pytest.approx(mean, rel=1e-12), (method, key)
        accs = [m["eval/accuracy"] for _, m in seeds.values()]
        assert row["accuracy_ci"] == pytest.approx(_t_ci(accs, 0, 1), rel=1e-9)
        assert row["accuracy_std"] == pytest.approx(np.std(accs, ddof=1), rel=1e-9)
        times = [m["train_time_s"] for _, m in seeds.values()]
        assert row["train_time_s_ci"] == pytest.approx(_log_ci(times), rel=1e-9)


def test_table_shows_mean_and_interval(bench):
    uri, parent, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    accs = METHODS["lora-r8"][1]
    half = (_t_ci(accs, 0, 1)[1] - _t_ci(accs, 0, 1)[0]) / 2
    row = next(line for line in md.splitlines() if line.startswith("| lora-r8"))
    assert f"{np.mean(accs):.4f} ± {half:.4f}" in row and "| 3/3 |" in row
    full_t, lora_t = st.gmean(METHODS["full"][2]), st.gmean(METHODS["lora-r8"][2])
    assert f"{100 * lora_t / full_t:.0f}%" in row
    # Time and memory: geometric mean [95% interval on the log scale], the column marked †.
    low, high = _log_ci(METHODS["lora-r8"][2])
    assert f"| {lora_t:,.1f} [{low:,.1f}, {high:,.1f}] |" in row
    mem = METHODS["lora-r8"][3]
    low, high = _log_ci(mem)
    assert f"| {st.gmean(mem):,.0f} [{low:,.0f}, {high:,.0f}] |" in row
    header = next(line for line in md.splitlines() if line.startswith("| Method |"))
    assert "| Accuracy |" in header and "| Train time (s) † |" in header
    assert "| Peak mem (MB) † |" in header and "| % of ref time |" in header
    assert "† = on the log scale: the geometric mean" in md
    assert "two seeds multiply" in md  # the limits of few seeds are said


def test_verdicts_against_reference(bench):
    uri, parent, _, result = bench
    per_seed = _per_seed(MlflowClient(uri), uri, parent)
    verdicts = {v["method"]: v for v in _summary(result)["verdicts"]}
    assert set(verdicts) == {"lora-r8", "dora-r8", "qlora-r8"}
    full = per_seed["full"]
    for method, v in verdicts.items():
        assert v["reference"] == "full"
        mine = per_seed[method]
        diffs = [mine[s][1]["eval/accuracy"] - full[s][1]["eval/accuracy"] for s in SEEDS]
        num = v["numbers"]
        assert num["accuracy_diff"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert num["accuracy_diff"]["ci"] == pytest.approx(_t_ci(diffs, -1, 1), rel=1e-9)
        logs = [math.log(mine[s][1]["train_time_s"] / full[s][1]["train_time_s"]) for s in SEEDS]
        assert num["time_ratio"]["mean"] == pytest.approx(math.exp(np.mean(logs)), rel=1e-12)
        ps = []
        for seed in SEEDS:  # McNemar from the predictions, counted and summed here
            ref_ok = predictions("full", seed) == LABELS
            my_ok = predictions(method, seed) == LABELS
            b, c = int((ref_ok & ~my_ok).sum()), int((my_ok & ~ref_ok).sum())
            p = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))
            assert num["mcnemar"][str(seed)] == {"b": b, "c": c, "p": pytest.approx(p, rel=1e-9)}
            ps.append(p)
        # Identical differences on every seed: no interval width, McNemar on every seed decides.
        same = np.std(diffs, ddof=1) < 1e-9
        assert num["significant"] == (all(p < 0.05 for p in ps) if same else
                                      not _t_ci(diffs)[0] <= 0 <= _t_ci(diffs)[1])
    assert verdicts["qlora-r8"]["significance"] == "significant"  # 3 pt below, tight seeds
    md = result.markdown_path.read_text(encoding="utf-8")
    assert "## Verdicts against full" in md and verdicts["dora-r8"]["sentence"] in md


def test_contaminated_timing_is_flagged_not_ranked(bench):
    _, _, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    html = result.html_path.read_text(encoding="utf-8")
    method, seed, share = CONTAMINATED
    assert f"Timing contaminated:** {method} (seed {seed})" in md and "60%" in md
    assert "Timing contaminated" in html and f"{method} (seed {seed})" in html
    rows = {r["method"]: r for r in _summary(result)["methods"]}
    assert rows[method]["pareto_optimal"] is None  # not ranked on time
    dora = next(line for line in md.splitlines() if line.startswith(f"| {method}"))
    lora = next(line for line in md.splitlines() if line.startswith("| lora-r8"))
    assert "⚠" in dora and "⚠" not in lora


def test_pareto_beyond_the_intervals(bench, tmp_path):
    _, _, _, result = bench
    best = {r["method"] for r in result.summary if r["pareto_optimal"]}
    # lora is fastest; full the most accurate; qlora is beaten by lora on both axes beyond the
    # intervals; dora (contaminated) is not ranked.
    assert best == {"lora-r8", "full"}
    uri, parent = build_store(tmp_path, failed=None, contaminated=None)
    clean = generate_report(parent, uri, tmp_path / "reports")
    # dora: slower than lora, but its accuracy interval overlaps lora's and is below full's:
    # nobody beats it beyond the noise.
    assert {r["method"] for r in clean.summary if r["pareto_optimal"]} == {"lora-r8", "dora-r8", "full"}
    assert "Timing contaminated" not in clean.markdown_path.read_text(encoding="utf-8")


def test_failed_method_in_table_not_in_charts(bench):
    _, _, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    name, _, error = FAILED
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    assert "FAILED" in row and "| 0/1 |" in row
    assert error.replace("|", "\\|") in row
    assert error in md  # unescaped, in the failures section
    summary = _summary(result)
    assert name not in summary["chart_methods"] and set(summary["chart_methods"]) == set(METHODS)
    failed = next(m for m in summary["methods"] if m["method"] == name)
    assert failed["status"] == "FAILED" and error in failed["error"]
    assert failed["pareto_optimal"] is None and failed["accuracy"] is None
    assert name in result.html_path.read_text(encoding="utf-8")


def test_partial_method_averages_finished_seeds(tmp_path):
    uri, parent = build_store(tmp_path, failed=None, contaminated=None)
    client = MlflowClient(uri)
    run = next(r for r in read_children(uri, parent) if r.data.tags["peft_bench.method"] == "lora-r8"
               and r.data.tags["peft_bench.seed"] == "3")
    retry = client.create_run(run.info.experiment_id, run_name="lora-r8-seed3", tags={
        **_child_tags(parent, "lora-r8", "lora", 3), "peft_bench.error": "killed"}).info.run_id
    client.set_terminated(retry, "FAILED")  # a later retry of seed 3 that failed stands for it
    result = generate_report(parent, uri, tmp_path / "reports")
    row = next(r for r in result.summary if r["method"] == "lora-r8")
    assert row["status"] == "PARTIAL" and row["n_seeds"] == 2 and row["failed_seeds"] == [3]
    assert row["accuracy"] == pytest.approx(np.mean(METHODS["lora-r8"][1][:2]), rel=1e-12)
    md = result.markdown_path.read_text(encoding="utf-8")
    assert "has 2 child runs" in md and "lora-r8 seed 3 (FAILED)" in md


def test_header_and_html(bench):
    uri, parent, _, result = bench
    md = result.markdown_path.read_text(encoding="utf-8")
    for text in ("sst2-small", parent, "openai-community/gpt2", "stanfordnlp/sst2",
                 "sha256:0f3c9e", "abc1234def", "torch 2.13.0", "transformers 5.1.0",
                 "**Seeds:** 1, 2, 3", "**reference method:** full",
                 f"mlflow ui --backend-store-uri {uri}"):
        assert text in md, text
    html = result.html_path.read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == len(result.charts)
    assert "<img src=\"http" not in html and ".png\"" not in html  # self-contained
    assert 'id="verdicts"' in html


def test_regressions_come_first(tmp_path):
    flags = {"baselines": ["abc"], "notes": [], "flags": [{
        "method": "lora-r8", "metric": "accuracy", "old": 0.95, "new": 0.902, "tolerance": 0.01,
        "runs": ["abc"]}]}
    uri, parent = build_store(tmp_path, failed=None, contaminated=None, regressions=flags)
    result = generate_report(parent, uri, tmp_path / "reports")
    md = result.markdown_path.read_text(encoding="utf-8")
    first = md.index("> **Regression:**")
    assert first < md.index("## Results")
    assert "lora-r8: accuracy 0.9500 → 0.9020" in md[first:]
    assert _summary(result)["regressions"][0].startswith("lora-r8: accuracy 0.9500 → 0.9020")
    assert 'id="regressions"' in result.html_path.read_text(encoding="utf-8")


def test_random_init_warning(bench, tmp_path):
    _, _, _, result = bench
    assert "randomly initialised" in result.markdown_path.read_text(encoding="utf-8")
    assert "randomly initialised" in result.html_path.read_text(encoding="utf-8").lower()
    uri, parent = build_store(tmp_path, random_init="false", failed=None)
    other = generate_report(parent, uri, tmp_path / "reports")
    assert "randomly initialised" not in other.markdown_path.read_text(encoding="utf-8")
    assert "randomly initialised" not in other.html_path.read_text(encoding="utf-8").lower()


def test_artifacts_logged_on_parent(bench):
    uri, parent, _, result = bench
    names = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report.md", "report.html", "summary.json"} <= names
    assert {c.name for c in result.charts} <= names


def test_missing_parent_leaves_nothing(tmp_path):
    uri, _ = build_store(tmp_path, failed=None)
    out = tmp_path / "reports"
    with pytest.raises(UnknownRun, match="0123456789abcdef0123456789abcdef.*not in the tracking"):
        generate_report("0123456789abcdef0123456789abcdef", uri, out)
    assert not (out / "0123456789abcdef0123456789abcdef").exists()
    assert not out.exists() or not any(out.iterdir())


def test_failure_midway_leaves_no_partial_report(tmp_path, monkeypatch):
    uri, parent = build_store(tmp_path, failed=None)
    out = tmp_path / "reports"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_mod, "render_html", boom)  # after the charts are on disk
    with pytest.raises(OSError, match="disk full"):
        generate_report(parent, uri, out)
    assert list(out.iterdir()) == []
    assert MlflowClient(uri).list_artifacts(parent, "report") == []


def test_reference_failed_and_rerun_replaces(tmp_path):
    methods = {k: v for k, v in METHODS.items() if k != "full"}
    uri, parent = build_store(tmp_path, methods=methods, failed=("full", "full", "OOM"))
    client = MlflowClient(uri)
    client.set_tag(parent, "peft_bench.reference", "full")
    first = generate_report(parent, uri, tmp_path / "reports")
    assert all(r["train_time_pct_of_ref"] is None for r in first.summary)
    md = first.markdown_path.read_text(encoding="utf-8")
    assert "reference method has no training time" in md and "full did not finish" in md
    again = generate_report(parent, uri, tmp_path / "reports")
    assert again.dir == first.dir and again.html_path.is_file()
    assert [p.name for p in (tmp_path / "reports").iterdir()] == [parent]


def test_rebuilt_report_keeps_a_users_files(tmp_path):
    """A rebuild replaces our files and removes our stale ones; a user's file in the report
    folder (and in a subfolder of it) survives."""
    uri, parent = build_store(tmp_path, failed=None)
    first = generate_report(parent, uri, tmp_path / "reports")
    (first.dir / "my-notes.md").write_text("keep me")
    (first.dir / "mine").mkdir()
    (first.dir / "mine" / "plot.svg").write_text("<svg/>")
    (first.dir / "stale-chart.png").write_bytes(b"png")  # as if an older version wrote it
    listed = json.loads((first.dir / ".peft-bench-files.json").read_text())
    listed["files"].append("stale-chart.png")
    (first.dir / ".peft-bench-files.json").write_text(json.dumps(listed))
    again = generate_report(parent, uri, tmp_path / "reports")
    assert again.dir == first.dir and again.html_path.is_file()
    assert (again.dir / "my-notes.md").read_text() == "keep me"
    assert (again.dir / "mine" / "plot.svg").read_text() == "<svg/>"
    assert not (again.dir / "stale-chart.png").exists()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [parent]  # no .old


def test_child_run_id_is_refused(bench):
    uri, parent, root, _ = bench
    child = read_children(uri, parent)[0].info.run_id
    with pytest.raises(ReportError, match="child run"):
        generate_report(child, uri, root / "other")


def test_latest_parent_run(bench):
    uri, parent, _, _ = bench
    assert latest_parent_run(uri, EXPERIMENT) == parent
    assert latest_parent_run(uri, "no-such-experiment") is None
    assert len(read_children(uri, parent)) == len(METHODS) * len(SEEDS) + 1


def test_task_fn_publishes_markdown(tmp_path, monkeypatch):
    """The task body without a Prefect server: the artifact call is captured."""
    uri, parent = build_store(tmp_path, failed=None)
    published = {}
    monkeypatch.setattr(report_mod, "create_markdown_artifact",
                        lambda **kw: published.update(kw))
    result = report_mod.generate_report_task.fn(parent, uri, tmp_path / "reports")
    assert result.html_path.is_file()
    assert published["key"] == "peft-bench-report"
    assert all(c.islower() or c.isdigit() or c == "-" for c in published["key"])
    assert "| lora-r8" in published["markdown"] and "](train_time.png)" not in published["markdown"]
