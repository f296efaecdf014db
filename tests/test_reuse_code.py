"""tasks.tracking.reuse.code_version hashes only the code that changes what a run computes or
records (`REUSE_CODE`): a copy of this checkout's flows/, tasks/ and peft_modules/ in a temporary
folder, edited one file at a time, keeps its hash under a CLI or report edit and changes it under
an edit to the training loop or the adapters."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.tracking import reuse
from tasks.tracking.reuse import REUSE_CODE, code_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path) -> Path:
    for folder in ("flows", "tasks", "peft_modules"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_every_listed_path_exists():
    assert [p for p in REUSE_CODE if not (ROOT / p).exists()] == []


def test_the_copy_hashes_like_the_checkout(tree):
    code_version.cache_clear()
    assert code_version(tree) == code_version()


def test_only_code_that_changes_a_run_changes_the_hash(tree):
    first = code_version(tree)
    _append(tree / "flows/cli/main.py", "\n# a help-text edit\n")
    _append(tree / "tasks/reporting/charts.py", "\n# a chart edit\n")
    code_version.cache_clear()  # the same root: a fresh read, not the cached hash
    assert code_version(tree) == first, "a CLI or report edit voided every reusable run"
    _append(tree / "tasks/train.py", "\n# a training-loop edit\n")
    code_version.cache_clear()
    after_train = code_version(tree)
    assert after_train != first
    _append(tree / "peft_modules/layers.py", "\n# an adapter edit\n")
    code_version.cache_clear()
    assert code_version(tree) not in (first, after_train)


def test_a_new_file_under_a_listed_folder_changes_the_hash(tree):
    first = code_version(tree)
    (tree / "tasks/training/extra.py").write_text("X = 1\n")
    code_version.cache_clear()
    assert code_version(tree) != first


def test_the_cache_is_keyed_by_root(tree, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(tree, other, dirs_exist_ok=True)
    _append(other / "tasks/evaluate.py", "\n# differs\n")
    assert code_version(tree) != code_version(other)
    assert reuse.code_version.cache_info().currsize >= 2
