"""Every check that can run before training, cheapest first, so bad input is refused in seconds
and before anything is left behind (no MLflow run, no model weights loaded, no server started).

- `check_light`: the output folder, the model folder's files, the data (pandas only, no torch,
  no Prefect). A data error is reported within seconds of the command.
- `check_heavy`: the device, the targets of every method on a meta-device instance of the model
  (its config only: no weights), and the MLflow store (reachable, or a new sqlite store created
  and migrated under a file lock so two first runs at once both work).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from tasks.common.secrets import has_secret, redact
from tasks.config.build import looks_local
from tasks.config.schema import BenchConfig, ConfigError, ModelConfig, TrackingConfig, TrainingConfig
from tasks.data.dataset import DataSummary
from tasks.models import files as model_files
from tasks.models.source import local_path
from tasks.prepare import validate_cached

# Any of these is a tokenizer vocabulary; tokenizer_config.json alone is not.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_output_dir(path: Path) -> None:
    """The report folder exists or can be made, and a file can be written in it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".peft-bench-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"report.output_dir: {path} is not writable ({e.strerror or e}); "
                          f"choose another folder with --set report.output_dir=...") from None


def check_model_files(model: ModelConfig) -> None:
    """A local model folder holds a config.json and a tokenizer: transformers would otherwise
    build an empty tokenizer silently, and the error would surface as a data problem."""
    if not looks_local(model.name_or_path):
        return
    path = Path(local_path(model)).expanduser()  # package:NAME: found and its digest checked
    where = redact(str(path))
    if not path.is_dir():
        raise ConfigError(f"model.name_or_path: directory not found: {where}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {where} has no config.json "
                          "(not a Hugging Face model directory)")
    model_files.check_folder(path)  # config.json parses; safetensors weights, headers intact
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
        raise ConfigError(f"model.name_or_path: {where} has no tokenizer files (one of "
                          f"{', '.join(TOKENIZER_FILES)}); save them next to the model with "
                          "tokenizer.save_pretrained(...)")


def check_deployable(cfg: BenchConfig) -> None:
    """With `dispatch: deployments` a worker gets the config as flow parameters, stored in
    Prefect's database: credentials cannot travel that way."""
    if cfg.dispatch != "deployments":
        return
    for field, value in (("tracking.tracking_uri", cfg.tracking.tracking_uri),
                         ("model.name_or_path", cfg.model.name_or_path),
                         ("data.source", cfg.data.source)):
        if has_secret(value):
            raise ConfigError(f"{field}: holds credentials ({redact(value)}); with dispatch: "
                              "deployments they would be stored in Prefect's database. Give "
                              "them to the workers' environment instead (MLFLOW_TRACKING_URI, "
                              "HF_TOKEN) and leave them out of the config")


def check_light(cfg: BenchConfig) -> DataSummary:
    check_output_dir(cfg.report.output_dir)
    check_model_files(cfg.model)
    check_deployable(cfg)
    return validate_cached(cfg.data)


def check_targets(cfg: BenchConfig) -> Optional[str]:
    """Every method's targets match layers of the model, checked on a meta-device instance
    built from its config (no weights); for a local folder, the config's field types and the
    weights' shapes too (model_files). Returns why it was skipped, if it was."""
    from peft_modules.inject import find_targets

    mc = cfg.model
    local = looks_local(mc.name_or_path)
    source = local_path(mc)
    try:
        config = model_files.load_config(mc, source, local)
    except OSError as e:  # a hub model while offline: its load reports the real error later
        return f"targets not checked: model config unavailable ({redact(str(e))[:200]})"
    model = model_files.meta_model(config, mc, source)
    if local:
        model_files.check_shapes(Path(source).expanduser(), config, model)
    for i, m in enumerate(cfg.methods):
        if m.method == "full":
            continue
        if m.method == "peft":
            check_peft(model, i, m)
            continue
        try:
            find_targets(model, m.adapter_spec())
        except ValueError as e:
            raise ConfigError(f"methods.{i} ({m.name}): {e}") from None
    return None


def check_peft(meta_model, i: int, m) -> None:
    """A method: peft that peft refuses on this model (a layer type its tuner does not
    support, targets matching nothing) is refused here, in peft's words, before any weights."""
    from peft_modules.inject import head_names
    from tasks.methods.hf_peft import refusal_on

    why = refusal_on(meta_model, m.peft, head_names(meta_model))
    if why is not None:
        raise ConfigError(f"methods.{i} ({m.name}): peft {m.peft['peft_type']} cannot run on "
                          f"this model: {why}")


def check_store(tracking: TrackingConfig) -> None:
    """The MLflow store answers; a new sqlite store is created and migrated under a lock."""
    from tasks.tracking.lifecycle import prepare_store
    from tasks.tracking.runs import check_reachable

    check_reachable(tracking)
    prepare_store(tracking)


def resolve_device(training: TrainingConfig):
    import torch

    if training.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if training.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda' requested but no CUDA device is available")
    return torch.device(training.device)


def check_heavy(cfg: BenchConfig) -> Optional[str]:
    """Needs torch, transformers and MLflow, never Prefect (the CLI starts its server later)."""
    resolve_device(cfg.training)
    skipped = check_targets(cfg)
    check_store(cfg.tracking)
    return skipped
