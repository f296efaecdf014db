"""The front page as a person sees it: README.md rendered to HTML (markdown-it-py, tables on, as
GitHub renders them) and opened in headless Chromium from the repository root, so its relative
image paths load as they do on the repository page."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from test_browser import CHROMIUM, browser  # noqa: F401  (the shared Chromium fixture)

ROOT = Path(__file__).resolve().parents[1]
PICTURE = "docs/img/quickstart-accuracy-vs-time.png"
COMMANDS = ("scripts/quickstart", "scripts/test")
# Rows a reader of the "What is measured" table must find (what the benchmark answers with).
MEASURED = ("accuracy", "paired verdict", "training time", "step time", "throughput",
            "peak memory", "model and adapter size", "trainable parameters", "contamination")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium here (`apt-get install chromium`; .ci/run installs it)")


@pytest.fixture
def front_page(browser, tmp_path):  # noqa: F811  (the imported fixture, by name)
    body = MarkdownIt("commonmark").enable("table").render(
        (ROOT / "README.md").read_text(encoding="utf-8"))
    html = tmp_path / "README.html"
    # <base> makes README's relative paths resolve from the repository root, as on GitHub.
    html.write_text(f'<!doctype html><html><head><meta charset="utf-8">'
                    f'<base href="{ROOT.as_uri()}/"></head><body>{body}</body></html>',
                    encoding="utf-8")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(html.as_uri())
    page.wait_for_load_state("load")  # every image has loaded or failed by now
    try:
        yield page
    finally:
        page.screenshot(path=str(tmp_path / "README.png"), full_page=True)
        page.close()


def test_the_front_page_shows_its_title_commands_and_measured_table(front_page):
    page = front_page
    assert page.locator("h1").first.inner_text() == "peft-bench"
    code = [page.locator("pre").nth(i).inner_text() for i in range(page.locator("pre").count())]
    for command in COMMANDS:
        assert any(line.split()[:1] == [command] for block in code for line in block.splitlines()), (
            f"no code block starts a line with {command!r}: {code}")
    tables = page.locator("table").filter(has=page.locator("th", has_text="MLflow name"))
    assert tables.count() == 1, "no 'What is measured' table with an 'MLflow name' column"
    table = tables.first
    assert table.is_visible()
    headers = [h.strip().lower() for h in table.locator("th").all_inner_texts()]
    assert headers[:2] == ["what", "how"], headers
    rows = [r.lower() for r in table.locator("tbody tr td:first-child").all_inner_texts()]
    missing = [m for m in MEASURED if not any(m in r for r in rows)]
    assert not missing, f"the measured table lacks {missing}; its rows: {rows}"


def test_every_image_on_the_front_page_loads(front_page):
    broken = front_page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0))"
               ".map(i => i.getAttribute('src'))")
    assert broken == [], f"README.md images that do not load: {broken}"


def test_the_front_page_shows_the_accuracy_vs_time_picture(front_page):
    assert (ROOT / PICTURE).is_file(), f"{PICTURE} is missing (scripts/front_page_picture makes it)"
    assert (ROOT / PICTURE).stat().st_size <= 200_000, f"{PICTURE} is over 200 kB"
    picture = front_page.locator(f'img[src="{PICTURE}"]')
    assert picture.count() == 1, f"README.md does not show {PICTURE}"
    width = picture.evaluate("i => i.naturalWidth")
    assert width > 0, f"{PICTURE} did not load"
    assert picture.is_visible() and picture.bounding_box()["width"] > 0
    assert picture.get_attribute("alt"), "the picture has no alt text"
