"""Hugging Face peft's adapter layout: adapter_model.safetensors + adapter_config.json.

An adapter saved here loads with `peft.PeftModel.from_pretrained(base, dir)`, and a LoRA/DoRA
adapter trained with peft loads here. The tensors are the same as ours under other names:

    ours                              peft (file key, adapter name "default" stripped by peft)
    <module>.lora_a.weight   (r, in)  base_model.model.<module>.lora_A.weight
    <module>.lora_b.weight   (out, r) base_model.model.<module>.lora_B.weight
    <module>.magnitude       (out,)   base_model.model.<module>.lora_magnitude_vector
    score.weight (the head)           base_model.model.score.weight   (peft's modules_to_save)

A and B are stored (r, in) / (out, r) by peft for GPT-2's Conv1D as well: `fan_in_fan_out` only
says how W0 is laid out, and peft sets it from the layer type on load. QLoRA/QDoRA files are
LoRA/DoRA files: the 4-bit base is the base model's business, not the adapter's.

peft options that AdapterSpec cannot express are refused by name, never silently dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from peft_modules import quant
from peft_modules.formats.common import CONFIG, check_fit
from peft_modules.inject import (
    HEAD_NAMES,
    AdapterSummary,
    adapter_layers,
    head_names,
    inject_adapters,
    resolve_targets,
)
from peft_modules.spec import AdapterSpec

PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our leaf name -> peft's (the adapter name peft inserts in memory is not in the file).
LEAVES = ((".lora_a.weight", ".lora_A.weight"), (".lora_b.weight", ".lora_B.weight"),
          (".magnitude", ".lora_magnitude_vector"))
# Our spec field -> peft's, to name peft's field when a value does not fit AdapterSpec.
SPEC_TO_PEFT = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "targets": "target_modules", "rslora": "use_rslora"}
# Fields we map, or that only describe the file / matter at init: read or ignored.
HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
           "use_rslora", "use_dora", "bias", "fan_in_fan_out", "modules_to_save",
           "init_lora_weights", "base_model_name_or_path", "revision", "peft_version",
           "inference_mode", "auto_mapping", "megatron_core", "qalora_group_size",
           "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
# Init schemes that leave W0 untouched. pissa/olora/corda/loftq/lora_ga rewrite W0 at init, so
# their adapter only fits that rewritten base; mica freezes B, which a spec cannot say.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def to_peft_key(name: str) -> str:
    for ours, theirs in LEAVES:
        if name.endswith(ours):
            return PREFIX + name[: -len(ours)] + theirs
    return PREFIX + name  # the head, saved by peft under its own module name


def from_peft_key(key: str) -> str:
    """peft's file key -> our parameter name; a foreign key is kept so the fit check names it."""
    if not key.startswith(PREFIX):
        return key
    name = key[len(PREFIX):]
    for ours, theirs in LEAVES:
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def _alpha(a: float):
    return int(a) if float(a).is_integer() else a  # peft types lora_alpha as int


def peft_config(model: nn.Module, spec: AdapterSpec,
                base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """peft's LoraConfig fields for `spec` on `model` (after inject_adapters)."""
    layers = adapter_layers(model)
    targets = resolve_targets(model, spec)  # explicit, so peft need not know our defaults
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None)
        or None,
        "r": spec.rank, "lora_alpha": _alpha(spec.alpha), "lora_dropout": spec.dropout,
        "target_modules": targets, "use_rslora": spec.rslora, "use_dora": spec.use_dora,
        "bias": "none", "lora_bias": False,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "modules_to_save": [n.split(".")[-1] for n in head_names(model)] if spec.train_head
        else None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, B, DoRA's m, and every head tensor, under our names. The head goes in even when it
    was frozen: peft's SEQ_CLS loader wants it, and a fresh head is random at each load."""
    out = {}
    for name, layer in adapter_layers(model).items():
        out[f"{name}.lora_a.weight"] = layer.lora_a.weight
        out[f"{name}.lora_b.weight"] = layer.lora_b.weight
        if hasattr(layer, "magnitude"):
            out[f"{name}.magnitude"] = layer.magnitude
    for head in head_names(model):
        for leaf, p in model.get_submodule(head).named_parameters():
            out[f"{head}.{leaf}"] = p
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_peft_adapter(model: nn.Module, spec: AdapterSpec, out_dir: str | Path,
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write peft's adapter_model.safetensors + adapter_config.json; returns the weights path."""
    if spec.method == "full":
        raise ValueError("method: 'full' trains every weight; peft's adapter layout cannot hold "
                         "it (use save_adapter, or save_pretrained the model)")
    if not adapter_layers(model):
        raise ValueError("model has no adapters: inject_adapters or load_adapter first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {to_peft_key(k): v for k, v in adapter_tensors(model).items()}
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    cfg = peft_config(model, spec, base_model_name_or_path)
    (out / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out / PEFT_WEIGHTS


def _refuse_unsupported(cfg: dict, where: str) -> None:
    """Raise a ValueError naming the first peft option that AdapterSpec cannot express."""
    def refuse(field: str, why: str):
        raise ValueError(f"{where}: {field}={cfg.get(field)!r}: {why}")

    if cfg.get("peft_type") != "LORA":
        refuse("peft_type", "only LORA adapters (LoRA, rsLoRA, DoRA) can be loaded")
    if cfg.get("task_type") not in (None, "SEQ_CLS"):
        refuse("task_type", "peft-bench adapts sequence-classification models only (SEQ_CLS)")
    if cfg.get("bias", "none") != "none":
        refuse("bias", "only bias='none' is supported; the base layers' biases stay frozen")
    extra = sorted(set(cfg.get("modules_to_save") or []) - set(HEAD_NAMES))
    if extra:
        refuse("modules_to_save", f"only the classification head {list(HEAD_NAMES)} can be "
                                  f"trained besides the adapters, not {extra}")
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        refuse("init_lora_weights", "this init rewrites the base weights or freezes B, so the "
                                    f"adapter does not fit a plain base; supported: {PLAIN_INITS}")
    for field in sorted(set(cfg) - HANDLED):
        if cfg[field]:  # rank_pattern, alpha_pattern, layers_to_transform, lora_bias, variants…
            refuse(field, "peft-bench cannot represent this LoRA option")


def spec_from_peft(cfg: dict, where: str = "adapter_config", quantized: bool = False
                   ) -> AdapterSpec:
    """Our AdapterSpec for a peft LoraConfig dict; ValueError naming the field if it cannot."""
    _refuse_unsupported(cfg, where)
    dora = bool(cfg.get("use_dora", False))
    method = ("qdora" if dora else "qlora") if quantized else ("dora" if dora else "lora")
    targets = cfg.get("target_modules")
    try:
        return AdapterSpec(method=method, rank=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8),
                           dropout=cfg.get("lora_dropout", 0.0),
                           targets=sorted(targets) if isinstance(targets, list) else targets,
                           rslora=bool(cfg.get("use_rslora", False)),
                           train_head=bool(cfg.get("modules_to_save")))
    except ValidationError as e:
        ours = str(e.errors()[0]["loc"][0])
        field = SPEC_TO_PEFT.get(ours, ours)
        raise ValueError(f"{where}: {field}={cfg.get(field)!r}: {e.errors()[0]['msg']}") from None


def read_peft_config(adapter_dir: str | Path, quantized: bool = False) -> AdapterSpec:
    """peft's adapter_config.json -> AdapterSpec. The file cannot say whether the base was 4-bit
    (peft has no QLoRA type): `quantized` picks qlora/qdora over lora/dora."""
    path = Path(adapter_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    return spec_from_peft(json.loads(path.read_text()), str(path), quantized)


def is_peft_dir(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / PEFT_WEIGHTS).is_file()


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterSummary:
    """Inject the adapter a peft-layout folder describes into a fresh base model and load its
    tensors. Only safetensors are read: a pickled adapter_model.bin is never unpickled."""
    path = Path(adapter_dir) / PEFT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: peft adapter weights not found (only safetensors are "
                                "read, never adapter_model.bin)")
    quantized = any(quant.is_linear4bit(m) for m in model.modules())
    spec = read_peft_config(adapter_dir, quantized=quantized)
    saved = {from_peft_key(k): v for k, v in load_file(str(path)).items()}
    summary = inject_adapters(model, spec)
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    heads = {n: p for n, p in adapter_tensors(model).items() if n not in trainable}
    check_fit(path, saved, trainable, optional=heads)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return summary
