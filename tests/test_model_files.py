"""Broken model folders are refused before any run, naming the file: config.json unreadable,
not JSON, not an object, or with a field of the wrong type; no weights; pickle-only weights
(never opened: the test pickle would run code); weights whose shapes do not fit the config;
a truncated safetensors file. Each case through preflight directly (fast); the pickle also
through the real CLI."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_bench_config
from mlflow.tracking import MlflowClient

from tasks import preflight
from tasks.config.build import build_config
from tasks.config.schema import ConfigError


class _RunsCode:
    """Unpickling this opens (creates) the marker file: stands for any code a pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_RunsCode(marker))


@pytest.fixture
def model(tmp_path, tiny_model_dir) -> Path:
    """A copy of the tiny GPT-2 (GPT2LMHeadModel's keys: `transformer.h.0...`) to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _cfg(tmp_path: Path, model_dir, sst2_dir):
    raw = make_bench_config(tmp_path, model_dir, sst2_dir)
    return build_config(raw, mlflow_yaml=None)


def _store(tmp_path: Path) -> Path:
    return tmp_path / "mlflow.db"


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_labels(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))


def _refused(check, cfg) -> str:
    with pytest.raises(ConfigError) as err:
        check(cfg)
    return str(err.value)


# ------------------------------------------------------------------ folders that are fine
def test_good_folders_pass(tmp_path, model, sst2_dir, tiny_model_dir):
    """With and without the base-model prefix, a sharded checkpoint, and a seq-cls checkpoint
    whose head has another num_labels (the head is initialised fresh by design)."""
    from _models import family_model_dir
    from transformers import GPT2ForSequenceClassification

    bert = family_model_dir("bert", tmp_path / "bert", tiny_model_dir)  # keys `encoder...`
    sharded = tmp_path / "sharded"
    three = GPT2ForSequenceClassification.from_pretrained(model, num_labels=3)
    three.save_pretrained(sharded, max_shard_size="50KB")
    _drop_labels(sharded)  # the config now makes a 2-label head; the checkpoint's has 3
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if (model / f).is_file():
            shutil.copy(model / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file()
    for folder in (model, bert, sharded):
        cfg = _cfg(tmp_path, folder, sst2_dir)
        cfg.methods = cfg.methods[:1]  # full: targets are for the GPT-2 layers
        preflight.check_model_files(cfg.model)
        assert preflight.check_targets(cfg) is None


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("text,message", [
    ('{"n_embd": 32,', "not valid JSON: Expecting property name enclosed in double quotes "
                       "at line 1 column 15"),
    ("[1, 2]", "holds a JSON list, not an object of settings"),
    (b'{"n_embd": "\xff"}', "not UTF-8 text (byte 12)"),
])
def test_config_json_that_does_not_parse_is_named(tmp_path, model, sst2_dir, text, message):
    path = model / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    got = _refused(preflight.check_light, _cfg(tmp_path, model, sst2_dir))
    assert got == f"model.name_or_path: {path}: {message}"


def test_unreadable_config_json_is_named(tmp_path, model, sst2_dir, monkeypatch):
    # The suite runs as root, which chmod 000 does not stop: the read fails as it would.
    path, read_text = model / "config.json", Path.read_text

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    got = _refused(preflight.check_light, _cfg(tmp_path, model, sst2_dir))
    assert got == f"model.name_or_path: {path}: cannot be read (Permission denied)"


@pytest.mark.parametrize("field,value,kind", [
    ("n_embd", "sixty-four", "expected int, got str (value: 'sixty-four')"),
    ("n_embd", "32", "expected int, got str (value: '32')"),
    ("n_layer", None, "expected int, got NoneType (value: None)"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, model, sst2_dir, field, value, kind):
    _edit_config(model, **{field: value})
    cfg = _cfg(tmp_path, model, sst2_dir)
    preflight.check_light(cfg)  # JSON is fine: types are transformers' to judge
    got = _refused(preflight.check_heavy, cfg)
    assert got.startswith(f"model.name_or_path: {model / 'config.json'}: ")
    assert f"field '{field}'" in got and kind in got
    assert not _store(tmp_path).exists()  # refused before the MLflow store was touched


def test_a_bert_field_of_the_wrong_type_is_named(tmp_path, sst2_dir, tiny_model_dir):
    from _models import family_model_dir

    bert = family_model_dir("bert", tmp_path / "bert", tiny_model_dir)
    _edit_config(bert, hidden_size="384")
    got = _refused(preflight.check_heavy, _cfg(tmp_path, bert, sst2_dir))
    assert f"{bert / 'config.json'}: Validation error for field 'hidden_size'" in got


def test_a_value_no_model_can_be_built_from_is_named(tmp_path, model, sst2_dir):
    _edit_config(model, n_embd=33)  # an int, but not divisible by the 2 heads
    got = _refused(preflight.check_heavy, _cfg(tmp_path, model, sst2_dir))
    assert got.startswith(f"model.name_or_path: {model / 'config.json'}: no model can be built")
    assert "divisible by num_heads" in got


# ------------------------------------------------------------------ weights
def test_no_weights_names_the_folder(tmp_path, model, sst2_dir):
    (model / "model.safetensors").rename(model / "weights.safetensors")
    got = _refused(preflight.check_light, _cfg(tmp_path, model, sst2_dir))
    assert got == (f"model.name_or_path: {model}: no model weights: neither model.safetensors "
                   "nor model.safetensors.index.json; found only ['weights.safetensors'] "
                   "(transformers loads model.safetensors)")


def test_pickle_only_weights_are_refused_and_never_opened(tmp_path, model, sst2_dir):
    (tmp_path / "control").mkdir()
    pickle.loads(evil_pickle(tmp_path / "control" / "ran"))
    assert (tmp_path / "control" / "ran").exists()  # the payload does run code when unpickled
    marker = tmp_path / "code-ran"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    got = _refused(preflight.check_light, _cfg(tmp_path, model, sst2_dir))
    assert got.startswith(f"model.name_or_path: {model / 'pytorch_model.bin'}: pickle weights; "
                          "peft-bench loads only safetensors weights")
    assert not marker.exists()


def test_loading_never_unpickles(tmp_path, model, monkeypatch):
    """Past the preflight too: load_model asks transformers for safetensors only, so a folder
    holding only a pickle is not torch.load-ed (transformers would, weights-only)."""
    import torch

    from tasks.config.schema import MethodConfig, ModelConfig
    from tasks.load import load_model

    def tripwire(*args, **kwargs):
        raise AssertionError("torch.load was called on model weights")

    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(evil_pickle(tmp_path / "code-ran"))
    monkeypatch.setattr(torch, "load", tripwire)
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(ModelConfig(name_or_path=str(model)), MethodConfig(name="f", method="full"),
                   2, 0, torch.device("cpu"))
    assert not (tmp_path / "code-ran").exists()


def test_a_truncated_safetensors_file_is_named(tmp_path, model, sst2_dir):
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])  # the header whole, the tensors cut short
    got = _refused(preflight.check_light, _cfg(tmp_path, model, sst2_dir))
    assert got.startswith(f"model.name_or_path: {weights}: not a readable safetensors file")
    assert "incomplete metadata" in got


def test_a_missing_or_truncated_shard_is_named(tmp_path, model, sst2_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model).save_pretrained(model, max_shard_size="50KB")
    (model / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    first, last = shards[0], shards[-1]
    cfg = _cfg(tmp_path, model, sst2_dir)
    (model / last).write_bytes((model / last).read_bytes()[:100])
    assert f"{model / last}: not a readable safetensors file" in _refused(preflight.check_light, cfg)
    (model / first).unlink()
    assert f"{model / first}: missing: model.safetensors.index.json lists it" in _refused(
        preflight.check_light, cfg)


def test_weights_that_do_not_fit_the_config_name_the_tensor(tmp_path, model, sst2_dir):
    _edit_config(model, vocab_size=600)  # the checkpoint's embedding has the tokenizer's 512
    got = _refused(preflight.check_heavy, _cfg(tmp_path, model, sst2_dir))
    assert got == (f"model.name_or_path: {model / 'model.safetensors'}: tensor "
                   "'transformer.wte.weight' has shape [512, 32], but config.json makes it "
                   "[600, 32]: the weights do not fit the config")
    assert not _store(tmp_path).exists()


def test_weights_without_the_prefix_are_compared_too(tmp_path, sst2_dir, tiny_model_dir):
    """A base-model checkpoint (AutoModel: `encoder.layer.0...`, no `bert.`)."""
    from _models import family_model_dir

    bert = family_model_dir("bert", tmp_path / "bert", tiny_model_dir)
    _edit_config(bert, intermediate_size=48)
    got = _refused(preflight.check_heavy, _cfg(tmp_path, bert, sst2_dir))
    assert (f"{bert / 'model.safetensors'}: tensor 'encoder.layer.0.intermediate.dense.bias' "
            "has shape [64], but config.json makes it [48]") in got


# ------------------------------------------------------------------ through the CLI
def test_the_cli_refuses_pickle_weights_before_any_run(tmp_path, model, sst2_dir):
    marker = tmp_path / "code-ran"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    cfg = make_bench_config(tmp_path, model, sst2_dir)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PEFT_BENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = subprocess.run([str(Path(sys.executable).parent / "peft-bench"), "run",
                          str(tmp_path / "run.yaml")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text[-2000:]
    assert f"error: model.name_or_path: {model / 'pytorch_model.bin'}: pickle weights" in text
    assert "Traceback" not in text and not marker.exists()
    db = _store(tmp_path)
    if db.exists():  # the store may be made by an earlier check; it holds no run
        client = MlflowClient(f"sqlite:///{db}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
