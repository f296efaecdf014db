"""The data check's cached summary (tasks/prepare.py `validate_cached`): the same summary as
checking the files afresh, a new check when a file's content changes (a bad row is then
found, never a stale summary served), nothing cached for bad data."""
from __future__ import annotations

import shutil
from dataclasses import asdict

import pytest

from tasks.config.schema import DataConfig
from tasks.data.dataset import validate_data
from tasks.data.labels import DataError
from tasks.prepare import validate_cached


@pytest.fixture
def data_dir(tmp_path, sst2_dir):
    """A small SST-2 copy we may edit: the first 300 training rows, the validation file."""
    out = tmp_path / "sst2"
    out.mkdir()
    lines = (sst2_dir / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "train.tsv").write_text("".join(lines[:301]), encoding="utf-8")
    shutil.copy(sst2_dir / "validation.tsv", out / "validation.tsv")
    return out


def _cfg(folder) -> DataConfig:
    return DataConfig(source=str(folder), train_size=200, eval_size=100, seed=3)


def test_a_cached_summary_equals_a_fresh_check(data_dir, tmp_path):
    cache = tmp_path / "cache"
    first = validate_cached(_cfg(data_dir), cache)
    assert len(list((cache / "validated").iterdir())) == 1  # written once
    second = validate_cached(_cfg(data_dir), cache)
    fresh = validate_data(_cfg(data_dir))
    assert asdict(first) == asdict(second) == asdict(fresh)
    assert second.label_counts["train"].keys() == {0, 1}  # int keys back from JSON
    other = validate_cached(_cfg(data_dir).model_copy(update={"seed": 4}), cache)
    assert other.digest != first.digest  # another config, another entry
    assert len(list((cache / "validated").iterdir())) == 2


def test_changed_content_is_checked_again(data_dir, tmp_path):
    cache = tmp_path / "cache"
    validate_cached(_cfg(data_dir), cache)
    train = data_dir / "train.tsv"
    text = train.read_text(encoding="utf-8").splitlines(keepends=True)
    text[5] = text[5].split("\t")[0] + "\n"  # the label cell gone: a malformed line
    train.write_text("".join(text), encoding="utf-8")
    with pytest.raises(DataError, match="train.tsv"):
        validate_cached(_cfg(data_dir), cache)
    assert len(list((cache / "validated").iterdir())) == 1  # nothing cached for bad data
