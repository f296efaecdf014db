"""The documentation: the front page stays a front page, every relative link in it and in docs/
leads somewhere, and the generated config reference matches the schema it is generated from."""
from __future__ import annotations

import html
import json
import re
import unicodedata
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from pydantic import BaseModel

from tasks.config import reference
from tasks.config.schema import BenchConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_REFERENCE = ROOT / "docs" / "config-reference.md"
# Fields declared outside tasks/config/schema.py that have no description yet; each owner file
# gets the description (the page shows an empty cell until then).
UNDESCRIBED_ELSEWHERE = {
    "methods[].method": "peft_modules/spec.py",
    "methods[].targets": "peft_modules/spec.py",
    "sweep.metric": "tasks/config/sweep.py",
}


def _tokens(path: Path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


def _targets(path: Path) -> list[str]:
    """Every link and image target in the page (code blocks and code spans excluded)."""
    found = []
    for token in _tokens(path):
        for child in token.children or []:
            if child.type == "link_open":
                found.append(child.attrs["href"])
            elif child.type == "image":
                found.append(child.attrs["src"])
    return found


def _github_anchor(heading: str) -> str:
    """GitHub's rule: lower case, punctuation (not - or _) dropped, each space a hyphen."""
    kept = "".join(c for c in heading.lower()
                   if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    tokens, out, seen = _tokens(path), set(), {}
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            text = "".join(c.content for c in tokens[i + 1].children
                           if c.type in ("text", "code_inline"))
            slug = _github_anchor(text)
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _targets(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_front_page_is_at_most_150_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 150, f"README.md has {lines} lines; move reference material to docs/"


def test_the_front_page_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _targets(README)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md's 'Where next' does not link {unlinked}"


def test_the_config_reference_is_regenerated():
    assert CONFIG_REFERENCE.read_text(encoding="utf-8") == reference.render(), (
        f"docs/config-reference.md is stale: run `{reference.COMMAND}` and commit the result")


def _leaves(model: type[BaseModel], prefix: str = ""):
    """(dotted key, FieldInfo) of every field, walking into nested sections by their types."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [a for a in _args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _leaves(nested[0], f"{key}[]." if _is_list(info.annotation) else f"{key}.")
        else:
            yield key, info


def _args(annotation) -> list:
    args = getattr(annotation, "__args__", None)
    return [annotation] if not args else [x for a in args for x in _args(a)]


def _is_list(annotation) -> bool:
    return getattr(annotation, "__origin__", None) is list or any(
        _is_list(a) for a in getattr(annotation, "__args__", ()))


def test_every_config_field_is_described():
    missing = [key for key, info in _leaves(BenchConfig)
               if not info.description and key not in UNDESCRIBED_ELSEWHERE]
    assert not missing, f"give these fields Field(description=...) in tasks/config/schema.py: {missing}"


def test_the_reference_has_a_row_per_field_with_its_default():
    rows = {}
    for line in CONFIG_REFERENCE.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^\| `([^`]+)` \| (.*)$", line):
            rows[m.group(1)] = html.unescape(m.group(2)).replace("\\|", "|")  # as rendered
    problems = []
    for key, info in _leaves(BenchConfig):
        if key not in rows:
            problems.append(f"{key}: no row")
        elif info.is_required():
            if "required" not in rows[key]:
                problems.append(f"{key}: not marked required")
        elif isinstance(info.default, (bool, int, float, str, type(None))):
            shown = f"`{json.dumps(info.default)}`"
            if shown not in rows[key]:
                problems.append(f"{key}: default {shown} not shown")
        if info.description and " ".join(info.description.split())[:30] not in rows.get(key, ""):
            problems.append(f"{key}: description not shown")
    assert not problems, problems
