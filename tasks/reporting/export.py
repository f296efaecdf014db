"""A benchmark's winner, one command away from being used: `peft-bench export` writes a run's
adapter in Hugging Face peft's layout (or a merged plain transformers model), and
`peft-bench promote` registers it in the MLflow Model Registry.

Everything is read from the run itself: its `config.yaml` (the resolved config it trained
with), its method tag and its `adapter/` artifact. A run that was reused from an earlier one
(`peft_bench.reused_from`) exports the original's adapter, which is the same.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from tasks.common import names
from tasks.config.schema import BenchConfig, MethodConfig
from tasks.reporting import outdir
from tasks.tracking import runs, store


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why."""


def _run(client: MlflowClient, run_id: str) -> Run:
    run = store.get_run(client, run_id)  # store.UnknownRun: the CLI's exit 2
    if run.data.tags.get(names.ROLE) not in (names.ROLE_CHILD, names.ROLE_GRID):
        raise ExportError(f"run {run_id!r} is not a training run (a method's run under a "
                          "benchmark, or a grid point); `peft-bench compare` lists them")
    if run.info.status != "FINISHED":
        raise ExportError(f"run {run_id!r} is {run.info.status}: only a FINISHED run has "
                          "weights worth exporting")
    return run


def run_config(client: MlflowClient, run: Run, tmp: Path) -> tuple[BenchConfig, MethodConfig]:
    """The config the run trained with: its own config.yaml has its seed and grid point."""
    path = client.download_artifacts(run.info.run_id, names.CONFIG_FILE, str(tmp))
    cfg = BenchConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    name = run.data.tags[names.METHOD]
    return cfg, next(m for m in cfg.methods if m.name == name)


def download_adapter(client: MlflowClient, run: Run, tmp: Path) -> Path:
    source = run.data.tags.get(names.REUSED_FROM, run.info.run_id)
    try:
        return Path(client.download_artifacts(source, names.ADAPTER_ARTIFACTS, str(tmp)))
    except MlflowException:
        raise ExportError(f"run {source!r} logged no weights (tracking.log_weights was off?)") from None


def export_run(tracking_uri: str, run_id: str, out: Path, merged: bool = False,
               force: bool = False) -> Path:
    """The run's adapter in peft's layout at `out`, or with `merged` (always for full
    fine-tuning) a plain transformers model with the adapter merged in. A non-empty `out` is
    refused unless `force`; even then only the files written here are replaced."""
    out = Path(out)
    outdir.check_destination(out, force)
    client = runs.client_at(tracking_uri)
    run = _run(client, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        cfg, method = run_config(client, run, Path(tmp))
        adapter = download_adapter(client, run, Path(tmp))
        staged = Path(staging) / "out"  # beside `out`: the same file system, so renames work
        if not merged and method.method != "full":
            shutil.copytree(adapter, staged)
        else:
            _merged(cfg, method, adapter, staged)
        return outdir.install(staged, out)


def _merged(cfg: BenchConfig, method: MethodConfig, adapter: Path, out: Path) -> Path:
    """Load the base as the run did (4-bit for QLoRA: the adapter was trained against that),
    load the weights, merge, and save an ordinary model with its tokenizer."""
    import torch
    from safetensors.torch import load_file

    import peft_modules as pm
    from tasks.data.collate import load_tokenizer
    from tasks.load import load_model

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    heads = [t for k, t in load_file(str(next(adapter.glob("*.safetensors")))).items()
             if k.endswith(("score.weight", "classifier.weight", "classifier.out_proj.weight"))]
    num_labels = heads[0].shape[0] if heads else 2
    model = load_model(cfg.model, method, num_labels, tokenizer.pad_token_id, torch.device("cpu"),
                       label_names=_label_names(adapter, num_labels))
    if method.method == "peft":  # peft's own loader and merge (peft docs: merge_and_unload)
        from peft import PeftModel

        plain = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    else:
        (pm.load_adapter if method.method == "full" else pm.load_peft_adapter)(model, adapter)
        plain = pm.merge_and_unload(model)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _label_names(adapter: Path, num_labels: int) -> Optional[list[str]]:
    """The class names a run trained on (the adapter folder's config.json, written when the
    labels were names), so a merged model says `positive`, not `LABEL_1`."""
    import json

    try:
        id2label = json.loads((adapter / "config.json").read_text(encoding="utf-8"))["id2label"]
        return [id2label[str(i)] for i in range(num_labels)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def promote(tracking_uri: str, run_id: str, name: str, alias: Optional[str] = None) -> str:
    """Register the run's peft adapter as a new version of registered model `name`, tagged
    with the base model, method and benchmark; optionally point `alias` at it. Returns the
    version."""
    client = runs.client_at(tracking_uri)
    run = _run(client, run_id)
    if run.data.tags.get(names.METHOD_KIND) == "full":
        raise ExportError(f"run {run_id!r} is full fine-tuning: it has no adapter to register; "
                          "`peft-bench export --merged` writes the whole model")
    source_run = store.get_run(client, run.data.tags.get(names.REUSED_FROM, run_id))
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="peft-bench adapters (Hugging Face "
                                       "peft layout): load with peft.PeftModel.from_pretrained")
    parent = run.data.tags.get(names.PARENT, "")
    if run.data.tags.get(names.ROLE) == names.ROLE_GRID:  # its parent is the method's run
        parent = client.get_run(parent).data.tags.get(names.BENCHMARK_RUN, parent)
    benchmark = client.get_run(parent).data.tags.get(names.BENCHMARK, "") if parent else ""
    tags = {"base_model": run.data.params.get("model.name_or_path", "unknown"),
            "method": run.data.tags.get(names.METHOD_KIND, "unknown"),
            "benchmark": benchmark, "benchmark_run": parent,
            "point": run.data.tags.get(names.POINT, "")}
    version = client.create_model_version(
        name, f"{source_run.info.artifact_uri}/{names.ADAPTER_ARTIFACTS}", run_id=run_id,
        tags=tags, description=f"{run.data.tags.get(names.METHOD)} from run {run_id}")
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version.version
