"""What a person sees, in a real browser (Debian's headless Chromium, driven by Playwright):
the MLflow UI over a finished toy benchmark, opened at the page peft-bench points to, and the
HTML report. Screenshots are logged as artifacts of an MLflow run, so a failure can be looked
at (`mlflow ui` on the test's store, experiment `browser-checks`); the first-screen test also
prints the paths of its own (under its tmp dir: `pytest -s` shows them)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_bench_config
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from flows.infra import stack

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


# Where a card is, as the browser lays it out: its title, the card, the charts' scrolling pane,
# and whether the title is what a click on it would hit (nothing drawn over it).
PLACE = """h => {
  const card = h.closest("[data-testid='experiment-view-compare-runs-card']");
  let pane = card.parentElement;
  while (pane && !(pane.scrollHeight > pane.clientHeight
                   && /(auto|scroll)/.test(getComputedStyle(pane).overflowY))) {
    pane = pane.parentElement;
  }
  const box = e => { const b = e.getBoundingClientRect();
                     return {top: b.top, bottom: b.bottom, left: b.left, right: b.right}; };
  const t = box(h);
  const hit = document.elementFromPoint(t.left + 5, (t.top + t.bottom) / 2);
  return {title: t, card: box(card), pane: pane ? box(pane) : null,
          paneScrolled: pane ? pane.scrollTop : null, pageScrolled: window.scrollY,
          onTop: hit !== null && h.contains(hit), elided: h.scrollWidth > h.clientWidth};
}"""
CARD = "[data-testid='experiment-view-compare-runs-card']"
# The first screen's cards, by title, and their bars: full and lora; the ratios lora's only
# (the reference, full, has none).
FIRST_SCREEN = {"accuracy_mean": 2, "time_ratio_vs_ref_mean": 1, "memory_ratio_vs_ref_mean": 1}
WIDTH, HEIGHT = 1280, 800


def _inside(inner: dict, outer: dict) -> bool:
    return (inner["top"] >= outer["top"] - 0.5 and inner["bottom"] <= outer["bottom"] + 0.5
            and inner["left"] >= outer["left"] - 0.5 and inner["right"] <= outer["right"] + 0.5)


def _printed_link(report_md: str) -> str:
    """The UI link the report shows (tasks/report.py; the CLI prints the same ui_path)."""
    found = re.findall(r"http://127\.0\.0\.1:5000/(#/[^\s`]+)", Path(report_md).read_text())
    assert len(found) == 1, found
    return found[0]


def _shoot(page, path: Path) -> None:
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")


def _check_first_screen(page, titles: dict) -> None:
    """Each card: its title on screen and not covered, the whole card inside the screen and the
    charts' pane, nothing scrolled, and its bars drawn (one per aggregate run with the metric)."""
    from playwright.sync_api import expect

    screen = {"top": 0, "bottom": HEIGHT, "left": 0, "right": WIDTH}
    for metric, bars in FIRST_SCREEN.items():
        assert titles[metric].count() == 1, f"no single card titled {metric}"
        at = titles[metric].evaluate(PLACE)
        assert at["pageScrolled"] == 0 and at["paneScrolled"] == 0, at
        assert _inside(at["title"], screen) and at["onTop"], f"{metric}'s title: {at}"
        assert _inside(at["card"], screen) and _inside(at["card"], at["pane"]), \
            f"{metric}'s card is not all on the first screen: {at}"
        card = page.locator(CARD).filter(has=titles[metric])
        expect(card.locator("g.point")).to_have_count(bars)
        assert "lora [ci]" in card.inner_text()  # the legend names the aggregate run


def _close_assistant(page, titles: dict) -> None:
    """MLflow's assistant panel opens on a first visit and narrows the cards (their longer
    titles elided, whole on hover). Closed, as a person would, the cards widen."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    close = page.get_by_role("button", name="Close", exact=True)  # the panel's only one
    if close.is_visible():
        close.click()
        close.wait_for(state="hidden")
    for metric in FIRST_SCREEN:  # wait for the new layout; the caller's assert says what is wrong
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_function("h => h.scrollWidth <= h.clientWidth",
                                   arg=titles[metric].element_handle(), timeout=10_000)


def test_the_printed_link_opens_accuracy_time_and_memory_on_the_first_screen(served, browser,
                                                                              tmp_path):
    """A person at a 1280x800 screen opens the link the report shows (and the CLI prints): the
    accuracy, time-ratio and memory-ratio charts of the aggregate runs are there, drawn,
    without scrolling, in peft-bench's saved view, filtered to the aggregate runs."""
    from playwright.sync_api import expect

    cfg, result, url, client, _ = served
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    link = _printed_link(result["report_md"])
    assert "viewStateShareKey=peft-bench-methods" in link
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    page.goto(f"{url}/{link}")
    titles = {m: page.get_by_role("heading", name=m, exact=True) for m in FIRST_SCREEN}
    shots = [tmp_path / "mlflow-first-screen.png", tmp_path / "mlflow-first-screen-no-assistant.png"]
    try:
        titles["accuracy_mean"].wait_for(timeout=90_000)
        first = page.locator(CARD).filter(has=titles["accuracy_mean"]).locator("g.point")
        expect(first).to_have_count(2, timeout=60_000)  # drawn: full and lora
        _shoot(page, shots[0])
        _check_first_screen(page, titles)
        body = page.inner_text("body")
        assert "Model training" in body and "Runs" in body
        for genai in ("Token Usage", "Cost Breakdown", "Tokens per Trace"):
            assert genai not in body, genai  # not the GenAI overview
        assert page.get_by_role("button", name="peft-bench: methods compared").is_visible()
        search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
        assert search.input_value() == "tags.peft_bench.role = 'aggregate'"
        _close_assistant(page, titles)
        _shoot(page, shots[1])
        for metric in FIRST_SCREEN:
            at = titles[metric].evaluate(PLACE)
            assert not at["elided"] and _inside(at["card"], at["pane"]), f"{metric}: {at}"
    finally:
        if not shots[0].exists():  # it failed before the first screenshot: what was there
            _shoot(page, shots[0])
        page.close()
        _keep(client, [s for s in shots if s.exists()])


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
