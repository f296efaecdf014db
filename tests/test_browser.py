"""What a person sees, in a real browser (Debian's headless Chromium, driven by Playwright):
the MLflow UI over a finished toy benchmark, opened at the page peft-bench points to, and the
HTML report. Screenshots are logged as artifacts of an MLflow run, so a failure can be looked
at (`mlflow ui` on the test's store, experiment `browser-checks`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import make_bench_config
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from flows.infra import stack
from tasks.tracking.runs import ui_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium here (`apt-get install chromium`; .ci/run installs it)")


@pytest.fixture(scope="module")
def served(prefect_harness, tmp_path_factory, tiny_model_dir, sst2_dir):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = make_bench_config(tmp, tiny_model_dir, sst2_dir)
    cfg["methods"] = cfg["methods"][:2]
    cfg["training"]["seeds"] = [1, 2]
    result = benchmark(config=cfg)
    uri = cfg["tracking"]["tracking_uri"]
    server = stack.start_mlflow_server(tmp / "stack", port=0, backend_store_uri=uri,
                                       artifacts_destination=str(tmp / "served"))
    try:
        yield cfg, result, server.url, MlflowClient(uri), tmp
    finally:
        stack.stop_procs([server])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _keep(client: MlflowClient, shots: list[Path]) -> None:
    exp = client.get_experiment_by_name("browser-checks") or None
    eid = exp.experiment_id if exp else client.create_experiment("browser-checks")
    run = client.create_run(eid, run_name="screenshots").info.run_id
    for shot in shots:
        client.log_artifact(run, str(shot))
    client.set_terminated(run, "FINISHED")


def test_mlflow_ui_compares_the_methods_on_its_first_screen(served, browser):
    cfg, result, url, client, tmp = served
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{url}/{ui_path(exp.experiment_id)}")
    page.get_by_text("accuracy_mean", exact=True).first.wait_for(timeout=60_000)
    shot = tmp / "mlflow-chart-view.png"
    page.screenshot(path=str(shot))
    try:
        body = page.inner_text("body")
        assert "full [ci]" in body and "lora [ci]" in body  # one row and bar per method
        assert "Model training" in body and "Runs" in body
        for genai in ("Token Usage", "Cost Breakdown", "Tokens per Trace"):
            assert genai not in body, genai  # not the GenAI overview
        # The chart of accuracy_mean is on screen, drawn (an SVG plot inside its card).
        card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
            has_text="accuracy_mean")
        if card.count() == 0:  # card markup differs: fall back to the chart's title
            card = page.get_by_text("accuracy_mean", exact=True).first.locator("xpath=../../..")
        assert card.first.locator("svg").count() > 0
    finally:
        _keep(client, [shot])


def test_html_report_renders_with_every_image(served, browser):
    cfg, result, url, client, tmp = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(Path(result["report_html"]).as_uri())
    page.wait_for_load_state("load")
    shot = tmp / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    try:
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) >= 5 and all(w > 0 for w in widths), widths
        table = page.locator("table").first
        assert table.is_visible()
        text = table.inner_text()
        assert "full" in text and "lora" in text and "Accuracy" in text
        assert page.locator("#verdicts").is_visible()
        assert "Under a memory budget" in page.inner_text("body")
        assert errors == []
    finally:
        _keep(client, [shot])
